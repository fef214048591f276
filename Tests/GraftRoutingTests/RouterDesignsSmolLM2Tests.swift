import Foundation
import Testing
import Graft
import GraftTestSupport

/// The router designs on SmolLM2 MoE-fied over tweets (E = 8, top-4, 512 calibration tokens; every 10th tweet held
/// out): RMoE's recurrent routers trained on training tweets, and test-time rewiring on a held-out context.
@Suite(.serialized) struct RouterDesignsSmolLM2Tests {
    /// SmolLM2 made an MoE base, its training tweets and held-out tweets (at most 32 tokens each).
    static func moeSmolLM2() throws -> (llama: LlamaModel, training: [[Int32]], heldOut: [[Int32]]) {
        let text = try SmolLM2TweetText(heldOutCount: .max)
        let llama = text.model, training = text.training, heldOut = text.heldOut
        var options = MoEficationOptions()
        options.experts = 8
        options.topK = 4
        options.maxTokens = 512
        try MoEfication.apply(to: llama, sequences: Array(training.prefix(200)), options: options)
        return (llama, training, heldOut)
    }

    /// The mean next-token loss of `sequences` in one padded batch (recorded for autograd), and its token count.
    static func loss(_ llama: LlamaModel, _ sequences: [[Int32]]) throws -> Tensor {
        let (batch, targets) = try SmolLM2TweetText.nextTokenBatch(sequences)
        return crossEntropy(try llama.logits(batch).reshaped([targets.count, llama.config.vocabSize]), targets: targets)
    }

    @Test func rmoeRoutersTrainedOnTweetsLowerTheLossAndHeldOutPerplexity() throws {
        let (llama, training, heldOut) = try Self.moeSmolLM2()
        let eval = Array(heldOut.prefix(24)), fixed = Array(training.suffix(16))
        let rmoe = try RMoE(model: llama, gruSize: 64, tuneExperts: false, addsBaseLogits: true, seed: 1)
        rmoe.install()
        let heldBefore = exp(Double(try withNoGrad { try Self.loss(llama, eval) }.item))
        let trainBefore = try withNoGrad { try Self.loss(llama, fixed) }.item
        let params = rmoe.trainableParameters
        let optimizer = AdamW(parameters: params, learningRate: 3e-3, weightDecay: 0)
        let steps = 7, rows = 4
        var trace: [String] = []
        for step in 0..<steps {
            optimizer.zeroGrad()
            let loss = try Self.loss(llama, (0..<rows).map { training[(step * rows + $0) % training.count] })
            loss.backward()
            optimizer.step()
            #expect(loss.item.isFinite, "step \(step): loss \(loss.item)")
            if step % 3 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f", step, loss.item)) }
        }
        print("RMoE SmolLM2 training loss by step: \(trace.joined(separator: ", "))")
        llama.resetMoERouterStatistics()
        let heldAfter = exp(Double(try withNoGrad { try Self.loss(llama, eval) }.item))
        let trainAfter = try withNoGrad { try Self.loss(llama, fixed) }.item
        let stats = rmoe.statistics
        let entropy = stats.map(\.meanEntropy).reduce(0, +) / Double(stats.count)
        let busiest = stats.map { $0.load.max() ?? 0 }.reduce(0, +) / Double(stats.count)
        print(String(format: "RMoE on SmolLM2 E=8 k=4 (GRU 64, %d trainable, experts frozen; %d steps of %d tweets, lr 3e-3): training-tweet loss %.3f -> %.3f, held-out perplexity %.1f -> %.1f on %d tweets; mean router entropy %.3f nats (log 8 = 2.079), busiest expert's load %.3f",
                     params.reduce(0) { $0 + $1.count }, steps, rows, trainBefore, trainAfter, heldBefore, heldAfter, eval.count, entropy, busiest))
        #expect(trainAfter < trainBefore - 0.05, "training loss \(trainBefore) -> \(trainAfter)")
        #expect(heldAfter < heldBefore, "held-out perplexity \(heldBefore) -> \(heldAfter)")
        #expect(stats.count == 30 && stats.allSatisfy { $0.tokens > 0 && $0.overflowCount == 0 })
        let generated = try llama.generate(prompt: eval[0], parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
        #expect(generated.count == 6)
    }

    @Test func rewiringOnAHeldOutContextLowersThePerplexityOfItsContinuation() throws {
        let (llama, _, heldOut) = try Self.moeSmolLM2()
        for b in llama.moeBlocks { b.combine = .probability }
        // A context of four held-out tweets; the next four are its continuation, scored given the context.
        let context = heldOut[0..<4].flatMap { $0 }, continuation = heldOut[4..<8].flatMap { $0 }
        let all = context + continuation
        func continuationPerplexity() throws -> Double {
            let logits = try withNoGrad { try llama.logits(TokenBatch(ids: all, batchSize: 1, length: all.count)) }
            let targets = all.indices.map { $0 >= context.count - 1 && $0 + 1 < all.count ? all[$0 + 1] : -100 }
            return exp(Double(crossEntropy(logits.reshaped([all.count, llama.config.vocabSize]), targets: targets).item))
        }
        let before = try continuationPerplexity()
        let rewiring = try RouterRewiring(model: llama)
        let losses = try rewiring.adapt(model: llama, context: context, steps: 6, learningRate: 0.1)
        let after = try continuationPerplexity()
        let moved = rewiring.offsets.map { $0.scalars.map { abs($0) }.reduce(0, +) / Float($0.count) }.reduce(0, +) / 30
        print(String(format: "Router rewiring on SmolLM2 E=8 k=4 (probability combine, 30 layers × 8 offsets, 6 Adam steps, lr 0.1) on a %d-token held-out context: context loss %.3f -> %.3f, perplexity of the %d-token continuation %.1f -> %.1f; mean |offset| %.3f",
                     context.count, losses.first ?? .nan, losses.last ?? .nan, continuation.count, before, after, moved))
        #expect((losses.last ?? .nan) < (losses.first ?? .nan) - 0.05)
        #expect(after < before, "continuation perplexity \(before) -> \(after)")
        let generated = try llama.generate(prompt: context, parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
        #expect(generated.count == 6)
    }

    /// ReXMoE on the MoE base: each layer's router also picks the experts of the adjacent layers (window 1), the
    /// pool opened after a third of the steps (progressive scaling routing), against the same router training on
    /// each layer's own experts only. Experts frozen, probability combining.
    @Test func rexmoeRoutersReuseAdjacentExpertsAtAStatedPerplexity() throws {
        let (llama, training, heldOut) = try Self.moeSmolLM2()
        let eval = Array(heldOut.prefix(24))
        try ExpertReuse.apply(to: llama, options: ExpertReuseOptions())
        let initial = llama.moeBlocks.map { ($0.routerWeight.scalars, $0.routerBias.scalars) }
        ExpertReuse.setReach(0, of: llama)
        let base = exp(Double(try withNoGrad { try Self.loss(llama, eval) }.item))
        let steps = 6, rows = 4
        func train(reach: (Int) -> Int?) throws -> (Double, Double) {
            for (b, (w, bias)) in zip(llama.moeBlocks, initial) {
                b.routerWeight.pointer.update(from: w, count: w.count)
                b.routerBias.pointer.update(from: bias, count: bias.count)
            }
            let optimizer = AdamW(parameters: ExpertReuse.trainableParameters(of: llama), learningRate: 3e-3, weightDecay: 0)
            for step in 0..<steps {
                ExpertReuse.setReach(reach(step), of: llama)
                optimizer.zeroGrad()
                let loss = try Self.loss(llama, (0..<rows).map { training[(step * rows + $0) % training.count] })
                loss.backward()
                optimizer.step()
                #expect(loss.item.isFinite, "step \(step): loss \(loss.item)")
            }
            llama.resetMoERouterStatistics()
            let perplexity = exp(Double(try withNoGrad { try Self.loss(llama, eval) }.item))
            return (perplexity, ExpertReuse.borrowedShare(of: llama))
        }
        let (own, ownBorrowed) = try train { _ in 0 }
        let (rex, borrowed) = try train { $0 < steps / 3 ? 0 : 1 }
        print(String(format: "ReXMoE on SmolLM2 E=8 k=4 (window 1: 16-24 candidate experts per layer, routers only, %d steps of %d tweets, lr 3e-3, pool opened at step %d): held-out perplexity %.1f (own experts only, same training: %.1f; untrained base: %.1f) on %d tweets; %.1f%% of dispatches to adjacent layers' experts",
                     steps, rows, steps / 3, rex, own, base, eval.count, 100 * borrowed))
        #expect(ownBorrowed == 0, "reach 0 routes only to the layer's own experts")
        #expect(borrowed > 0.01, "the opened pool is used: \(borrowed)")
        #expect(rex.isFinite && own.isFinite && rex < base && own < base, "router training lowers held-out perplexity: \(base) -> \(own) (own), \(rex) (reuse)")
        ExpertReuse.setReach(nil, of: llama)
        let generated = try llama.generate(prompt: eval[0], parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
        #expect(generated.count == 6)
    }
}
