import Foundation
import Testing
import Graft
import GraftTestSupport

/// Duo-LLM on SmolLM2 (frozen base): each layer's FFN with a small companion (its 256 most important neurons of
/// 1536) and a router choosing skip, small or big per token, trained on tweets toward half the FFN compute.
/// Reports the held-out compute per token, the choice histogram and perplexity against the dense model and the
/// small FFNs alone. Twenty steps; the quality at that compute after longer training is `bench/moe` row 9's.
@Suite struct DuoLLMSmolLM2Tests {
    @Test func routedTokensSpendAboutTheTargetComputeAtAStatedPerplexity() throws {
        let text = try SmolLM2TweetText()
        let llama = text.model
        let dense = try text.heldOutPerplexity()
        var options = DuoLLMOptions()
        options.smallSize = 256
        options.initialBias = 1.5
        options.maxTokens = 1024
        options.seed = 1
        let blocks = try DuoLLM.apply(to: llama, sequences: text.training, options: options)
        // Every token on the small FFNs (untrained): what the slices alone keep.
        for b in blocks { b.routerBias.pointer.update(from: [-100, 100, -100], count: 3) }
        let smallOnly = try text.heldOutPerplexity()
        for b in blocks { b.routerBias.pointer.update(from: [0, 0, options.initialBias], count: 3) }
        DuoLLM.setMode(.straightThrough, of: llama)
        // The routers start from scratch; the small FFNs are pretrained slices and take a small learning rate.
        _ = DuoLLM.trainableParameters(of: llama)
        let routerOptimizer = AdamW(parameters: blocks.flatMap { [$0.routerWeight, $0.routerBias] }, learningRate: 2e-2, weightDecay: 0)
        let smallOptimizer = AdamW(parameters: blocks.flatMap { [$0.smallGate, $0.smallUp, $0.smallDown] }, learningRate: 3e-4, weightDecay: 0)
        var trace: [String] = [], losses: [Float] = []
        let steps = 20
        for step in 0..<steps {
            let (batch, targets) = try text.batch(step: step, rows: 4)
            let (loss, compute) = try DuoLLM.trainingLoss(model: llama, batch: batch, targets: targets, targetCompute: 0.5,
                                                          computeWeight: 10)
            #expect(loss.item.isFinite)
            losses.append(loss.item)
            loss.backward()
            for o in [routerOptimizer, smallOptimizer] {
                o.step()
                o.zeroGrad()
            }
            if step % 5 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f (compute %.2f)", step, loss.item, compute)) }
        }
        for p in DuoLLM.trainableParameters(of: llama) { p.requiringGrad(false) }
        DuoLLM.setMode(.hard, of: llama)
        DuoLLM.resetStatistics(of: llama)
        let routed = try text.heldOutPerplexity()
        let compute = DuoLLM.measuredCompute(of: llama)
        let histogram = blocks.map(\.statistics.dispatchedTokens).reduce([0, 0, 0]) { zip($0, $1).map(+) }
        let total = Double(histogram.reduce(0, +))
        print(String(format: "Duo-LLM SmolLM2: held-out FFN compute %.3f of dense (skip %.3f, small %.3f, big %.3f), perplexity %.2f (dense %.2f, small FFNs only %.2f); training %@",
                     compute, Double(histogram[0]) / total, Double(histogram[1]) / total, Double(histogram[2]) / total,
                     routed, dense, smallOnly, trace.joined(separator: ", ")))
        #expect(compute < 0.8, "the compute loss moves tokens off the big FFN: \(compute)")
        #expect(routed.isFinite && routed < smallOnly, "routing beats the small FFNs alone: \(routed) against \(smallOnly)")
        let first = losses.prefix(5).reduce(0, +) / 5, last = losses.suffix(5).reduce(0, +) / 5
        #expect(last < first, "training lowers the objective (mean of the first five steps \(first), of the last five \(last))")
    }
}
