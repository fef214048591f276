import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport
import GraftText
@testable import GraftTrain

/// Ten optimizer steps of each LoRA variant (its registry example config, plus the SVD initializations) on the
/// demo tweets lower the training loss with the classifier head frozen, so the adapter alone does it. RoSA's
/// example warm-up (2 steps) picks its mask inside the run through the trainer's hook.
@Suite(.serialized) struct LoRAVariantTrainingTests {
    static var variants: [(String, [String: Any])] { [
        ("LORAXS", LoRAXSFactory.exampleConfig(targets: ["query", "value"])),
        ("ASYMMETRIC_LORA", AsymmetricLoRAFactory.exampleConfig(targets: ["query", "value"])),
        ("SVFT", SVFTFactory.exampleConfig(targets: ["query", "value"])),
        ("ROSA", RoSAFactory.exampleConfig(targets: ["query", "value"])),
        ("LORA", ["r": 8, "lora_alpha": 16, "init_lora_weights": "pissa", "target_modules": ["query", "value"]]),
        ("LORA", ["r": 8, "lora_alpha": 16, "init_lora_weights": "milora", "target_modules": ["query", "value"]]),
        ("LORA", ["r": 8, "lora_alpha": 16, "init_lora_weights": "corda", "target_modules": ["query", "value"]]),
    ] }

    @Test(arguments: 0..<7)
    func tenStepsLowerTheTrainingLoss(index: Int) throws {
        var (type, json) = Self.variants[index]
        json["peft_type"] = type
        let name = "\(type) \(json["init_lora_weights"] ?? "")"
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 1)
        let model = AdaptedModel(root: classifier)
        try model.addAdapter("default", config: AdapterConfig(json: json, source: name), seed: 1)
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (tr, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        let train = try ExampleTokenizer.classification(Array(tr.prefix(40)), tokenizer: tokenizer, maxLength: 48)
        let objective = SequenceClassificationObjective(model: classifier)
        if json["init_lora_weights"] as? String == "corda" {
            try model.initializeCorDA("default") { _ = try objective.loss(try PackedBatch(train[0..<16])) }
        }
        var config = TrainerConfig()
        config.batchSize = 8
        config.learningRate = 5e-3
        config.shuffle = false
        let trainer = try Trainer(model: model, adapterName: "default", objective: objective, config: config)
        let before = try trainer.evaluate(train)
        try trainer.train(train, maxSteps: 10)
        let after = try trainer.evaluate(train)
        print("\(name): training loss \(before.loss) -> \(after.loss)")
        #expect(after.loss < before.loss, "\(name): training loss \(before.loss) -> \(after.loss)")
        if let rosa = try model.adapter("default").layers.first?.adapter as? RoSALayer {
            #expect(rosa.maskReady, "RoSA chose no mask in 10 steps")
            #expect(rosa.values.scalars.contains { $0 != 0 }, "RoSA's sparse values never trained")
        }
    }
}
