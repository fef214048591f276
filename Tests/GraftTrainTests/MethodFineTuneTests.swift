import Foundation
import Graft
import GraftTestSupport
import Testing

/// Every registered method, with the config `graft methods` shows as its example, fine-tuned for a few steps on
/// the demo tweets: its trainable parameters alone (the classification head stays frozen) must lower the loss.
@Suite(.serialized) struct MethodFineTuneTests {
    static let steps = 8

    @Test func everyMethodLowersTheTrainingLossOnTheDemoData() throws {
        let bert = try Assets.loadMiniLM()
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (train, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        let examples = try ExampleTokenizer.classification(Array(train.prefix(16)), tokenizer: tokenizer, maxLength: 32)
        var configs: [(String, [String: Any])] = []
        for (type, f) in AdapterRegistry.factories.sorted(by: { $0.key < $1.key }) {
            configs.append((type, f.exampleConfig(targets: ["query", "value"])))
        }
        for (type, f) in AdapterRegistry.moduleFactories.sorted(by: { $0.key < $1.key }) {
            configs.append((type, f.exampleConfig(targets: [])))
        }
        var report: [String] = []
        for (type, example) in configs {
            var json = example
            json["peft_type"] = type
            json["modules_to_save"] = nil
            if json["token_indices"] != nil {
                // Trainable tokens must be tokens the data uses: [CLS], [SEP] and the first example's words.
                json["token_indices"] = Array(Set(examples[0].ids.map(Int.init))).sorted()
            }
            let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
            let model = AdaptedModel(root: classifier)
            try model.addAdapter("default", config: AdapterConfig(json: json, source: type), seed: 1)
            var config = TrainerConfig()
            config.batchSize = examples.count
            config.learningRate = 5e-3
            config.schedule = .constant
            config.weightDecay = 0
            config.shuffle = false
            let trainer = try Trainer(model: model, adapterName: "default",
                                      objective: SequenceClassificationObjective(model: classifier), config: config)
            let before = try trainer.evaluate(examples).loss
            let batch = try PackedBatch(ArraySlice(examples), padded: model.needsPaddedBatches)
            for _ in 0..<Self.steps {
                _ = try trainer.accumulate(batch)
                trainer.optimizerStep(totalSteps: 1 << 20)
            }
            let after = try trainer.evaluate(examples).loss
            report.append("\(type) \(String(format: "%.4f", before)) -> \(String(format: "%.4f", after))")
            #expect(after < before - 1e-3, "\(type): the training loss went \(before) -> \(after) in \(Self.steps) steps")
            try model.deleteAdapter("default")
        }
        print("fine-tune, \(Self.steps) steps on 16 demo tweets (loss before -> after):\n  " + report.joined(separator: "\n  "))
    }
}
