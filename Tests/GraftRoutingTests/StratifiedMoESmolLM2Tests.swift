import Foundation
import Testing
import Graft
import GraftTestSupport

/// Stratified MoE on SmolLM2's last four layers: stratum 0 holds a copy of the layer's FFN, stratum 1 two new
/// experts of 384 neurons, top-1. Two settings: tokens held on the FFN copy at the start (bias 4, the upcycled model
/// near the dense one), and a weak start bias with a stronger balance loss and faster routers, where tokens learn
/// to skip the copy (one small pass). Reports held-out perplexity against the dense model, the expert passes per
/// token and the FFN FLOPs per token.
@Suite(.serialized) struct StratifiedMoESmolLM2Tests {
    struct Run {
        let start: Double, trained: Double, passes: Double, flops: Double
    }

    static func run(_ text: SmolLM2TweetText, bias: Float, balance: Float, routerScale: Float, steps: Int, dense: Double) throws -> Run {
        let llama = text.model
        var options = StratifiedMoEOptions()
        options.strata = [1, 2]
        options.newExpertSize = 384
        options.topK = 1
        options.layers = [26, 27, 28, 29]
        options.firstStratumBias = bias
        options.balanceLossWeight = balance
        let blocks = try StratifiedMoE.upcycle(llama, options: options)
        defer { llama.removeMoEBlocks() }
        llama.resetMoERouterStatistics()
        let start = try text.heldOutPerplexity()
        let parameters = StratifiedMoE.trainableParameters(of: llama)
        let optimizer = AdamW(parameters: parameters, learningRate: 1e-4, weightDecay: 0)
        // The routers may learn faster than the pretrained experts (a parameter group of their own).
        let routerTensors = Set(blocks.flatMap { $0.routers.flatMap { [ObjectIdentifier($0.weight), ObjectIdentifier($0.bias)] } })
        optimizer.learningRateScales = parameters.map { routerTensors.contains(ObjectIdentifier($0)) ? routerScale : 1 }
        var trace: [String] = []
        for step in 0..<steps {
            let (batch, targets) = try text.batch(step: step, rows: 4)
            let loss = try StratifiedMoE.trainingLoss(model: llama, batch: batch, targets: targets)
            #expect(loss.item.isFinite)
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
            if step % 5 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f", step, loss.item)) }
        }
        for p in parameters { p.requiringGrad(false) }
        llama.resetMoERouterStatistics()
        let trained = try text.heldOutPerplexity()
        let passes = blocks.compactMap(\.meanPasses).reduce(0, +) / Double(blocks.count)
        let flops = blocks.compactMap(\.measuredFlopsPerToken).reduce(0, +) / Double(blocks.count)
        let histogram = blocks.map { $0.passHistogram.map(String.init).joined(separator: "/") }.joined(separator: ", ")
        print(String(format: "SMoE SmolLM2 layers 26-29 (strata 1+2, new experts 384, top-1; start bias %.0f, balance %.2f, router lr ×%.0f): held-out perplexity dense %.2f, upcycled %.2f, after %d steps %.2f with %.3f expert passes per token (1/2-pass tokens per layer %@) at %.2f MFLOP/token per layer (dense FFN %.2f); training %@",
                     bias, balance, routerScale, dense, start, steps, trained, passes, histogram, flops / 1e6,
                     Double(6 * llama.config.hiddenSize * llama.config.intermediateSize) / 1e6, trace.joined(separator: ", ")))
        return Run(start: start, trained: trained, passes: passes, flops: flops)
    }

    @Test func tokensTakeDynamicPassesAtAStatedPerplexity() throws {
        let text = try SmolLM2TweetText()
        let dense = try text.heldOutPerplexity()
        let held = try Self.run(text, bias: 4, balance: 0.01, routerScale: 1, steps: 10, dense: dense)
        #expect(abs(held.start - dense) < 0.1 * dense, "the upcycled strata start near the dense model: \(held.start) vs \(dense)")
        #expect(held.trained < held.start, "training lowers the held-out perplexity: \(held.start) -> \(held.trained)")
        // Routers 100× faster first unsettle the upcycled model: 24 steps bring the perplexity back below its start.
        let dynamic = try Self.run(text, bias: 1, balance: 0.1, routerScale: 100, steps: 24, dense: dense)
        #expect(dynamic.passes < 1.95, "with a weak start bias some tokens learn to take one pass: \(dynamic.passes)")
        #expect(dynamic.flops < held.flops && dynamic.trained.isFinite && dynamic.trained < dynamic.start,
                "skipping tokens save FLOPs while training still lowers the perplexity: \(dynamic.start) -> \(dynamic.trained)")
    }
}
