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
        let examples = try ExampleTokenizer.classification(Array(train.prefix(8)), tokenizer: tokenizer, maxLength: 32)
        var configs: [(String, [String: Any])] = []
        for (type, f) in AdapterRegistry.factories.sorted(by: { $0.key < $1.key }) {
            configs.append((type, f.exampleConfig(targets: ["query", "value"])))
        }
        // Decoder-only methods (LLaMA-Adapter, CPT) fine-tune on SmolLM2 in DecoderMethodFineTuneTests.
        for (type, f) in AdapterRegistry.moduleFactories.sorted(by: { $0.key < $1.key }) where !f.requiresDecoder {
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
            let started = Date()
            let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
            let model = AdaptedModel(root: classifier)
            try model.addAdapter("default", config: AdapterConfig(json: json, source: type), seed: 1)
            let config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 5e-3)
            let trainer = try Trainer(model: model, adapterName: "default",
                                      objective: SequenceClassificationObjective(model: classifier), config: config)
            let before = try trainer.evaluate(examples).loss
            let batch = try PackedBatch(ArraySlice(examples), padded: model.needsPaddedBatches)
            for _ in 0..<Self.steps {
                _ = try trainer.accumulate(batch)
                try trainer.optimizerStep(totalSteps: 1 << 20)
            }
            let after = try trainer.evaluate(examples).loss
            report.append("\(type) \(String(format: "%.4f -> %.4f (%.1f s)", before, after, Date().timeIntervalSince(started)))")
            #expect(after < before - 5e-4, "\(type): the training loss went \(before) -> \(after) in \(Self.steps) steps")
            try model.deleteAdapter("default")
        }
        print("fine-tune, \(Self.steps) steps on 8 demo tweets (loss before -> after, time):\n  " + report.joined(separator: "\n  "))
    }
}

/// AdaLoRA's training-time behaviour: the cubic rank budget, pruning to it, and the orthogonality penalty.
@Suite(.serialized) struct AdaLoRATrainingTests {
    @Test func budgetFallsCubicallyAndTrainingPrunesToTheTarget() throws {
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
        let model = AdaptedModel(root: classifier)
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: [
            "peft_type": "ADALORA", "init_r": 6, "target_r": 2, "lora_alpha": 8, "target_modules": ["query", "value"],
            "tinit": 2, "tfinal": 3, "deltaT": 1, "total_step": 12, "orth_reg_weight": 0.5,
        ], source: "test"), seed: 1)
        defer { try? model.deleteAdapter("default") }
        let allocator = try #require(adapter.trainingHooks.first as? AdaLoRARankAllocator)
        let layers = adapter.layers.count
        #expect(allocator.initialBudget == 6 * layers && allocator.targetBudget == 2 * layers)
        // PEFT's schedule: full budget through tinit, cubic fall to the target at total_step - tfinal.
        #expect(allocator.schedule(step: 2, totalSteps: 12) == (6 * layers, false))
        let mid = allocator.schedule(step: 5, totalSteps: 12)
        #expect(mid.budget == Int(Double(4 * layers) * pow(1 - 3.0 / 7, 3) + Double(2 * layers)) && mid.mask)
        #expect(allocator.schedule(step: 10, totalSteps: 12) == (2 * layers, true))

        // The penalty is on the tape: its gradient matches central differences.
        let a = try #require(adapter.layers.first?.adapter as? AdaLoRALayer).loraA
        let penalty = try #require(allocator.regularization())
        penalty.backward()
        let analytic = try #require(a.grad).pointer[5]
        let saved = a.pointer[5]
        let h: Float = 1e-2
        a.pointer[5] = saved + h
        let up = withNoGrad { allocator.regularization()?.item ?? 0 }
        a.pointer[5] = saved - h
        let down = withNoGrad { allocator.regularization()?.item ?? 0 }
        a.pointer[5] = saved
        #expect(abs(Double(analytic) - Double(up - down) / Double(2 * h)) < 2e-3 * max(1, abs(Double(analytic))))
        a.grad = nil

        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (train, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        let examples = try ExampleTokenizer.classification(Array(train.prefix(16)), tokenizer: tokenizer, maxLength: 32)
        var config = TrainerConfig()
        config.batchSize = 16
        config.learningRate = 5e-3
        config.shuffle = false
        let trainer = try Trainer(model: model, adapterName: "default",
                                  objective: SequenceClassificationObjective(model: classifier), config: config)
        let batch = try PackedBatch(ArraySlice(examples))
        for _ in 0..<12 {
            _ = try trainer.accumulate(batch)
            try trainer.optimizerStep(totalSteps: 12)
        }
        let kept = adapter.layers.reduce(0) { n, l in
            n + ((l.adapter as? AdaLoRALayer)?.loraE.scalars.filter { $0 != 0 }.count ?? 0)
        }
        #expect(kept == 2 * layers, "nonzero singular values after training: \(kept), budget \(2 * layers)")
        #expect(allocator.rankPattern?.flatMap { $0 }.filter { $0 }.count == 2 * layers)
    }
}
