import Foundation
import Testing
import Graft
import GraftTestSupport

/// Mixture-of-Recursions made from SmolLM2 (frozen): layers 12–14 become a shared block recursed once or twice in
/// place of layers 12–17 (layers 15–17 dropped), and a router trained on tweets picks each token's depth. Reports
/// the average recursion depth and held-out perplexity against the dense model and both fixed depths.
@Suite struct MixtureOfRecursionsSmolLM2Tests {
    @Test func aRoutedSharedBlockLandsBetweenItsFixedDepthsAtAStatedPerplexity() throws {
        let path = try Assets.require(Assets.smollm2)
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let tokenizer = try BPETokenizer(ggufFile: path)
        let tweets = try TweetCorpus.load(path: try Assets.require(Assets.tweets)).train.map(\.text)
        let all = tweets.prefix(400).map { Array(tokenizer.encode($0).prefix(32)) }.filter { $0.count >= 4 }
        let training = all.enumerated().filter { $0.offset % 10 != 9 }.map(\.element)
        let heldOut = Array(all.enumerated().filter { $0.offset % 10 == 9 }.map(\.element).prefix(24))

        func perplexity() throws -> Double {
            var sum = 0.0, count = 0
            for ids in heldOut {
                let logits = try withNoGrad { try llama.logits(TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
                let loss = crossEntropy(logits.reshaped([ids.count, llama.config.vocabSize]), targets: Array(ids.dropFirst()) + [-100])
                sum += Double(loss.item) * Double(ids.count - 1)
                count += ids.count - 1
            }
            return exp(sum / Double(count))
        }
        let dense = try perplexity()
        let routing = try MixtureOfRecursions(model: llama, blockStart: 12, blockEnd: 15, suffixStart: 18, maxRecursions: 2,
                                              firstDepthBias: 0, seed: 1)
        llama.depthPolicy = routing
        routing.forcedDepth = 1
        let shallow = try perplexity()
        routing.forcedDepth = 2
        let deep = try perplexity()
        routing.forcedDepth = nil

        routing.trainsRouter = true
        let optimizer = AdamW(parameters: routing.namedParameters().map { $0.tensor.requiringGrad() }, learningRate: 1e-2, weightDecay: 0)
        let steps = 40, rows = 4, penalty: Float = 0.3
        var trace: [String] = []
        for step in 0..<steps {
            let batch = try TokenBatch(sequences: (0..<rows).map { training[(step * rows + $0) % training.count] })
            var targets = [Int32](repeating: -100, count: batch.batchSize * batch.length)
            for r in 0..<rows {
                for i in 0..<(batch.lengths[r] - 1) { targets[r * batch.length + i] = batch.ids[r * batch.length + i + 1] }
            }
            optimizer.zeroGrad()
            let (loss, depth) = try routing.trainingLoss(model: llama, batch: batch, targets: targets, computePenalty: penalty)
            loss.backward()
            optimizer.step()
            #expect(loss.item.isFinite, "step \(step): objective \(loss.item)")
            if step % 8 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f/%.2f", step, loss.item, depth)) }
        }
        print("MoR SmolLM2 training (objective / mean recursion depth): \(trace.joined(separator: ", "))")
        routing.trainsRouter = false
        routing.resetStatistics()
        let routed = try perplexity()
        let depth = routing.statistics.meanDepth
        let layers = Double(routing.layersRun(depth: 0, layerCount: 30)) + depth * 3
        print(String(format: "SmolLM2 MoR (block 12-14 shared for 12-17, N=2, penalty %.1f): mean recursion depth %.2f (%.1f layers per token), held-out perplexity %.2f; depth 1 everywhere (27 layers) %.2f, depth 2 everywhere (30 layers, shared) %.2f, dense %.2f on %d tweets",
                     penalty, depth, layers, routed, shallow, deep, dense, heldOut.count) + ", depth histogram \(routing.statistics.dispatchedTokens)")
        #expect([dense, shallow, deep, routed].allSatisfy { $0.isFinite })
        #expect(routing.statistics.tokens == heldOut.reduce(0) { $0 + $1.count })
        #expect(depth >= 1 && depth <= 2)
    }
}
