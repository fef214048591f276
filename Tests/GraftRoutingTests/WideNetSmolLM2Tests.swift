import Foundation
import Testing
import Graft
import GraftTestSupport

/// WideNet on SmolLM2's last four layers (two groups of two, top-1): each group's layers share one router over the
/// group's two FFNs. Reports held-out perplexity of the dense model, of the WideNet as fitted, and after training
/// the shared routers and per-layer norms on tweets, with the share of tokens that run their own layer's FFN.
@Suite struct WideNetSmolLM2Tests {
    @Test func sharedFFNsAcrossLayerPairsAtAStatedPerplexity() throws {
        let text = try SmolLM2TweetText()
        let llama = text.model
        let dense = try text.heldOutPerplexity()
        var options = WideNetOptions()
        options.groupSize = 2
        options.layers = [26, 27, 28, 29]
        options.maxTokens = 512
        options.balanceLossWeight = 0.01
        let groups = try WideNet.apply(to: llama, sequences: text.training, options: options)
        #expect(groups == [[26, 27], [28, 29]])
        llama.resetMoERouterStatistics()
        let fitted = try text.heldOutPerplexity()
        let fittedShare = WideNet.ownLayerShare(of: llama)
        let optimizer = AdamW(parameters: WideNet.trainableParameters(of: llama), learningRate: 1e-3, weightDecay: 0)
        var trace: [String] = []
        let steps = 12
        for step in 0..<steps {
            let (batch, targets) = try text.batch(step: step, rows: 4)
            let loss = try llama.moeTrainingLoss(batch: batch, targets: targets)
            #expect(loss.item.isFinite)
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
            if step % 4 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f", step, loss.item)) }
        }
        for p in WideNet.trainableParameters(of: llama) { p.requiringGrad(false) }
        llama.resetMoERouterStatistics()
        let trained = try text.heldOutPerplexity()
        let trainedShare = WideNet.ownLayerShare(of: llama)
        print(String(format: "WideNet SmolLM2 layers 26-29 in pairs, top-1: held-out perplexity dense %.2f, fitted %.2f (own-FFN share %.3f), after %d steps of routers and norms %.2f (own-FFN share %.3f); training %@",
                     dense, fitted, fittedShare, steps, trained, trainedShare, trace.joined(separator: ", ")))
        #expect(fittedShare > 0.7, "the fitted shared routers send most tokens to their own layer's FFN: \(fittedShare)")
        #expect(fitted.isFinite && trained.isFinite)
        #expect(trained < fitted, "training the routers and norms lowers the held-out perplexity: \(fitted) -> \(trained)")
    }
}
