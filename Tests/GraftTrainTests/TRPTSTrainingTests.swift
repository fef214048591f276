import Foundation
import Testing
@testable import GraftAdapters
import GraftModels
import GraftTestSupport
import GraftText
@testable import GraftTrain

/// TR-PTS fine-tuned through ``Trainer`` on the demo tweets, with and without token reduction: the Fisher phase
/// ends at `fisher_steps` inside the run (every layer allocated, the budget kept, the values' optimizer state
/// reset), the adapter alone lowers the loss, and the reduction's token and FLOP savings and the accuracy with and
/// without it are printed.
@Suite(.serialized) struct TRPTSTrainingTests {
    static func data() throws -> (train: [TokenizedExample], test: [TokenizedExample]) {
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (tr, te) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        // The corpus is grouped by class: take examples spread over it.
        func spread(_ all: [LabeledText], _ n: Int) -> [LabeledText] { (0..<n).map { all[$0 * all.count / n] } }
        return (try ExampleTokenizer.classification(spread(tr, 320), tokenizer: tokenizer, maxLength: 48),
                try ExampleTokenizer.classification(spread(te, 300), tokenizer: tokenizer, maxLength: 48))
    }

    static func run(_ json: [String: Any], steps: Int, train: [TokenizedExample], test: [TokenizedExample], classifierTrains: Bool)
        throws -> (before: EvaluationMetrics, afterTrain: EvaluationMetrics, afterTest: EvaluationMetrics, adapter: NamedAdapter, bert: BertModel) {
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 1)
        let model = AdaptedModel(root: classifier)
        var config = json
        if classifierTrains { config["modules_to_save"] = ["classifier"] }
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: config, source: "TR_PTS"), seed: 1)
        var trainer = TrainerConfig()
        trainer.batchSize = 16
        trainer.learningRate = 5e-3
        trainer.shuffle = false
        let t = try Trainer(model: model, adapterName: "default", objective: SequenceClassificationObjective(model: classifier), config: trainer)
        let before = try t.evaluate(train)
        try t.train(train, maxSteps: steps)
        return (before, try t.evaluate(train), try t.evaluate(test), adapter, bert)
    }

    @Test(arguments: [1.0, 0.5])
    func fisherPhaseEndsInsideTheRunAndTheLossFalls(keep: Double) throws {
        let (train, test) = try Self.data()
        let json: [String: Any] = ["peft_type": "TR_PTS", "budget": 20_000, "fisher_steps": 3, "token_keep_ratio": keep,
                                   "target_modules": ["query", "value"]]
        let r = try Self.run(json, steps: 12, train: (0..<96).map { train[$0 * 10 / 3] }, test: Array(test.prefix(32)), classifierTrains: false)
        let layers = r.adapter.layers.compactMap { $0.adapter as? TRPTSLayer }
        #expect(layers.allSatisfy { $0.isAllocated } && layers.reduce(0) { $0 + $1.count } == 20_000)
        #expect(r.adapter.parameterCount == 20_000)
        print("TR-PTS keep \(keep): training loss \(r.before.loss) -> \(r.afterTrain.loss); per layer \(layers.map(\.count))")
        #expect(r.afterTrain.loss.isFinite && r.afterTrain.loss < r.before.loss, "keep \(keep): \(r.before.loss) -> \(r.afterTrain.loss)")
        if keep < 1 {
            let stats = try #require(r.bert.tokenReduction?.statistics)
            #expect(stats.layerTokensReduced < stats.layerTokensFull && stats.flopsReduced < stats.flopsFull)
        } else {
            #expect(r.bert.tokenReduction == nil)
        }
    }

    /// The demo recipe in small (320 tweets, 60 steps of 16, classifier trained): accuracy with and without
    /// token reduction, and what the reduction saves on these batches.
    @Test func accuracyWithAndWithoutTokenReduction() throws {
        let (train, test) = try Self.data()
        var lines: [String] = []
        for keep in [1.0, 0.5] {
            let json: [String: Any] = ["peft_type": "TR_PTS", "budget": 75_000, "fisher_steps": 5, "token_keep_ratio": keep,
                                       "target_modules": ["query", "value"]]
            let r = try Self.run(json, steps: 60, train: train, test: test, classifierTrains: true)
            #expect(r.afterTest.loss.isFinite && r.afterTrain.loss < r.before.loss)
            var line = String(format: "keep %.1f: test accuracy %.3f (loss %.4f), train loss %.4f -> %.4f", keep,
                              r.afterTest.accuracy, r.afterTest.loss, r.before.loss, r.afterTrain.loss)
            if let s = r.bert.tokenReduction?.statistics {
                line += String(format: "; tokens through the layers %d -> %d (-%.1f%%), encoder FLOPs -%.1f%%", s.layerTokensFull, s.layerTokensReduced,
                               100 * (1 - Double(s.layerTokensReduced) / Double(s.layerTokensFull)), 100 * (1 - s.flopsReduced / s.flopsFull))
            }
            lines.append(line)
        }
        print("TR-PTS on 320 demo tweets (spread over the classes), 60 steps, 300 test tweets:\n  " + lines.joined(separator: "\n  "))
    }
}
