import Foundation
import Testing
import Graft
import GraftTestSupport

/// DyT on SmolLM2 (frozen): dispatchers and adapters on every layer trained on tweets toward an FFN activation
/// rate. Reports the held-out activation rate, the FFN FLOPs per token and held-out perplexity against the dense
/// model and against the same adapters trained with every token running the FFN. Twenty steps show the rate loss
/// at work; the quality at that compute after longer training is `bench/moe` row 8's.
@Suite struct DyTSmolLM2Tests {
    @Test func dispatchedTokensSkipTheFFNAtAStatedPerplexity() throws {
        let text = try SmolLM2TweetText()
        let llama = text.model
        let dense = try text.heldOutPerplexity()
        let ff = llama.config.intermediateSize, steps = 20

        /// Trains fresh DyT blocks for `steps` steps; returns the held-out perplexity, activation rate and FLOPs.
        func run(targetRate: Float, rateWeight: Float, label: String) throws -> (Double, Double, Double, [Float]) {
            var options = DyTOptions()
            options.adapterDim = 16
            options.seed = 1
            options.initialBias = 1.5
            let blocks = try DyT.apply(to: llama, options: options)
            DyT.setMode(.straightThrough, of: llama)
            let optimizer = AdamW(parameters: DyT.trainableParameters(of: llama), learningRate: 2e-2, weightDecay: 0)
            var trace: [String] = [], losses: [Float] = []
            for step in 0..<steps {
                let (batch, targets) = try text.batch(step: step, rows: 4)
                let (loss, rate) = try DyT.trainingLoss(model: llama, batch: batch, targets: targets, targetRate: targetRate,
                                                        rateWeight: rateWeight)
                #expect(loss.item.isFinite)
                losses.append(loss.item)
                loss.backward()
                optimizer.step()
                optimizer.zeroGrad()
                if step % 5 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f (rate %.2f)", step, loss.item, rate)) }
            }
            for p in DyT.trainableParameters(of: llama) { p.requiringGrad(false) }
            DyT.setMode(.hard, of: llama)
            DyT.resetStatistics(of: llama)
            let ppl = try text.heldOutPerplexity()
            let rate = DyT.activationRate(of: llama)
            let flops = blocks.reduce(0.0) { $0 + $1.flopsPerToken(rate: $1.statistics.meanDepth, intermediate: ff) }
            print(String(format: "DyT SmolLM2 %@: held-out FFN activation rate %.3f, FFN+adapter %.1f MFLOP/token (dense %.1f), perplexity %.2f (dense %.2f); training %@",
                         label, rate, flops / 1e6, Double(6 * 576 * ff * llama.layers.count) / 1e6, ppl, dense,
                         trace.joined(separator: ", ")))
            llama.removeMoEBlocks()
            return (ppl, rate, flops, losses)
        }
        let (full, fullRate, _, fullLosses) = try run(targetRate: 1, rateWeight: 0, label: "adapters only (no rate loss)")
        let (routed, rate, flops, losses) = try run(targetRate: 0.5, rateWeight: 10, label: "target rate 0.5, rate weight 10")
        #expect(fullRate > 0.9, "without a rate loss nearly every token keeps its FFN: \(fullRate)")
        #expect(rate < 0.8, "the rate loss makes tokens skip: held-out rate \(rate)")
        #expect(flops < 0.85 * Double(6 * 576 * ff * llama.layers.count))
        #expect(routed.isFinite && full.isFinite && dense.isFinite)
        for (name, trace) in [("adapters only", fullLosses), ("rate loss", losses)] {
            let first = trace.prefix(5).reduce(0, +) / 5, last = trace.suffix(5).reduce(0, +) / 5
            #expect(last < first, "\(name): training lowers the objective (mean of the first five steps \(first), of the last five \(last))")
        }
    }
}
