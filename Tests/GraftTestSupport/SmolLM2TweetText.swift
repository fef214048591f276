import Foundation
import GraftIO
import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// SmolLM2 (frozen, from the fetched GGUF) with the corpus's tweets as language-model text, for tests that train
/// something on it: the first `tweets` training tweets tokenized (at most `maxTokens` ids each, at least 4), every
/// 10th held out.
public struct SmolLM2TweetText {
    /// The model.
    public let model: LlamaModel
    /// Training sequences.
    public let training: [[Int32]]
    /// Held-out sequences (the first `heldOutCount`).
    public let heldOut: [[Int32]]

    /// Loads the model and tokenizes the tweets.
    public init(tweets count: Int = 400, maxTokens: Int = 32, heldOutCount: Int = 24) throws {
        let path = try Assets.require(Assets.smollm2)
        model = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let tokenizer = try BPETokenizer(ggufFile: path)
        let tweets = try TweetCorpus.load(path: try Assets.require(Assets.tweets)).train.map(\.text)
        let all = tweets.prefix(count).map { Array(tokenizer.encode($0).prefix(maxTokens)) }.filter { $0.count >= 4 }
        training = all.enumerated().filter { $0.offset % 10 != 9 }.map(\.element)
        heldOut = Array(all.enumerated().filter { $0.offset % 10 == 9 }.map(\.element).prefix(heldOutCount))
    }

    /// Held-out perplexity of the model as it is now, one sequence per pass (so each takes its own route through
    /// any per-token routing).
    public func heldOutPerplexity() throws -> Double {
        var sum = 0.0, count = 0
        for ids in heldOut {
            let logits = try withNoGrad { try model.logits(TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
            let loss = crossEntropy(logits.reshaped([ids.count, model.config.vocabSize]), targets: Array(ids.dropFirst()) + [-100])
            sum += Double(loss.item) * Double(ids.count - 1)
            count += ids.count - 1
        }
        return exp(sum / Double(count))
    }

    /// Training batch `step` of `rows` sequences (cycling through the training set) with its next-token targets
    /// (-100 past each sequence's end).
    public func batch(step: Int, rows: Int) throws -> (TokenBatch, [Int32]) {
        try Self.nextTokenBatch((0..<rows).map { training[(step * rows + $0) % training.count] })
    }

    /// `sequences` as one padded batch with its next-token targets (-100 past each sequence's end).
    public static func nextTokenBatch(_ sequences: [[Int32]]) throws -> (TokenBatch, [Int32]) {
        let batch = try TokenBatch(sequences: sequences)
        var targets = [Int32](repeating: -100, count: batch.batchSize * batch.length)
        for r in 0..<batch.batchSize {
            for i in 0..<(batch.lengths[r] - 1) { targets[r * batch.length + i] = batch.ids[r * batch.length + i + 1] }
        }
        return (batch, targets)
    }
}
