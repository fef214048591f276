import Foundation
import Testing
import Graft
import GraftTestSupport

/// MoEfication of SmolLM2 on real text (tweets; every 10th held out): the routers beat a random router on the
/// held-out calibration tokens, and top-4 of 8 experts keeps held-out perplexity within a stated factor of dense.
@Suite struct MoEficationSmolLM2Tests {
    @Test func moefiedSmolLM2RoutesBetterThanChanceAndStaysWithin20TimesDensePerplexity() throws {
        let path = try Assets.require(Assets.smollm2)
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let tokenizer = try BPETokenizer(ggufFile: path)
        let tweets = try TweetCorpus.load(path: try Assets.require(Assets.tweets)).train.map(\.text)
        let encode = { (t: String) in Array(tokenizer.encode(t).prefix(48)) }
        let calibration = tweets.prefix(400).enumerated().filter { $0.offset % 10 != 9 }.map { encode($0.element) }
        let heldOut = tweets.prefix(400).enumerated().filter { $0.offset % 10 == 9 }.prefix(12).map { encode($0.element) }
        let examples = heldOut.filter { $0.count >= 2 }.map { TokenizedExample(ids: $0, targets: Array($0.dropFirst()) + [-100]) }
        func perplexity() throws -> Double {
            let r = try CausalLMObjective(model: llama).evaluate(try PackedBatch(examples[...], padded: false))
            return exp(r.lossSum / Double(r.count))
        }
        let dense = try perplexity()
        var options = MoEficationOptions()
        options.experts = 8
        options.topK = 4
        options.maxTokens = 512
        let reports = try MoEfication.apply(to: llama, sequences: calibration, options: options)
        #expect(reports.count == 30)
        let agreement = reports.map(\.heldOutAgreement).reduce(0, +) / 30
        print(String(format: "SmolLM2 MoEfication E=8 k=4 on 512 tokens: mean held-out top-4 agreement %.3f (random 0.5)", agreement))
        #expect(agreement > 0.6, "mean held-out top-4 agreement \(agreement) is not above a random router's 0.5")
        let routed = try perplexity()
        print(String(format: "held-out perplexity on %d tweets: dense %.2f, E=8 k=4 %.2f", examples.count, dense, routed))
        #expect(dense.isFinite && routed.isFinite)
        #expect(routed < 20 * dense, "k=4 of 8 perplexity \(routed) is beyond 20× dense \(dense)")
        #expect(routed > dense, "dropping half of every FFN cannot be free: \(routed) vs \(dense)")
    }
}
