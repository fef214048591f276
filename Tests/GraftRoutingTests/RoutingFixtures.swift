import Foundation
import Graft
import GraftTestSupport

/// Fixtures the routing suites share: MiniLM tweet classifiers, greedy continuations by full passes, the
/// finite-difference objective.
enum RoutingFixtures {
    /// MiniLM with a fresh 3-label head (seed 3), its tokenizer and the first `count` demo training tweets.
    static func tweets(_ count: Int) throws -> (classifier: BertForSequenceClassification, tokenizer: WordPieceTokenizer, texts: [LabeledText]) {
        let bert = try Assets.loadMiniLM()
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (train, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        return (try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3), tokenizer, Array(train.prefix(count)))
    }

    /// The classifier and the first `count` tweets tokenized for sentiment (at most 32 tokens).
    static func tweetClassification(_ count: Int) throws -> (classifier: BertForSequenceClassification, examples: [TokenizedExample]) {
        let (classifier, tokenizer, texts) = try tweets(count)
        return (classifier, try ExampleTokenizer.classification(texts, tokenizer: tokenizer, maxLength: 32))
    }

    /// Two tasks over the first `count` tweets, interleaved per tweet: task 0 the sentiment label, task 1 "mentions a
    /// car" (a keyword label).
    static func twoTaskTweets(_ count: Int) throws -> (classifier: BertForSequenceClassification, examples: [TokenizedExample]) {
        let (classifier, tokenizer, texts) = try tweets(count)
        let sentiment = try ExampleTokenizer.classification(texts, tokenizer: tokenizer, maxLength: 32)
        let cars = try ExampleTokenizer.classification(
            texts.map { LabeledText(text: $0.text, label: $0.text.lowercased().contains("car") ? 1 : 0) }, tokenizer: tokenizer, maxLength: 32)
        var examples: [TokenizedExample] = []
        for (s, c) in zip(sentiment, cars) {
            var x = s, y = c
            x.taskID = 0
            y.taskID = 1
            examples += [x, y]
        }
        return (classifier, examples)
    }

    /// `steps` greedy tokens after `prompt`, each from a full uncached pass over the sequence so far (ties to the
    /// lowest id): what cached generation must reproduce.
    static func greedyByFullPasses(_ model: LlamaModel, prompt: [Int32], steps: Int) throws -> [Int32] {
        var sequence = prompt
        for _ in 0..<steps {
            let logits = try withNoGrad { try model.logits(try TokenBatch(sequences: [sequence])) }
            let vocab = logits.lastDim
            let last = Array(logits.scalars[((sequence.count - 1) * vocab)...])
            sequence.append(Int32(last.indices.max { last[$0] < last[$1] || (last[$0] == last[$1] && $0 > $1) } ?? 0))
        }
        return Array(sequence.suffix(steps))
    }

    /// `Σ logits · probe` in double precision without gradients: the finite-difference objective.
    static func probed(_ model: LlamaModel, _ batch: TokenBatch, _ probe: Tensor) throws -> Double {
        let y = try withNoGrad { try model.logits(batch) }
        return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
    }
}
