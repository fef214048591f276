import Foundation
import Testing
@testable import Graft
@testable import GraftRouting
import GraftTestSupport

/// X-LoRA with `use_trainable_adapters: true` (PEFT's option): the LoRA experts train together with the classifier.
/// Their gradients match finite differences through the scaling, fine-tuning lowers the loss and moves them, and a
/// save reloads the trained experts from the X-LoRA file rather than from their directories.
@Suite(.serialized) struct XLoRATrainableTests {
    static func trainable() -> [String: Any] {
        ["layerwise_scalings": true, "xlora_depth": 2, "xlora_size": 8, "use_trainable_adapters": true]
    }

    @Test func expertGradientsMatchFiniteDifferences() throws {
        let bert = try Assets.loadMiniLM()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-xlora-tgrad-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let experts = try XLoRATests.miniLMExperts(bert, dir: dir)
        let model = AdaptedModel(root: bert, methods: .all)
        let adapter = try model.addAdapter("x", config: try XLoRATests.xloraConfig(experts, Self.trainable()), seed: 3)
        // Every expert factor of every adapted layer is a trainable, saved tensor (PEFT's expert numbers 0, 1, 2).
        let factors = adapter.peftStateDict
        #expect(factors.count == 2 * adapter.layers.reduce(0) { $0 + (($1.adapter as? XLoRALayer)?.members.count ?? 0) })
        #expect(factors.allSatisfy { $0.tensor.requiresGrad && ($0.key.contains(".lora_A.") || $0.key.contains(".lora_B.")) })
        #expect(Set(factors.compactMap { $0.key.split(separator: ".").dropLast().last.map(String.init) }) == ["0", "1", "2"])
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 1037, 2204, 2154, 102]])
        var rng = GraftRNG(seed: 7)
        let weights = Tensor.randomUniform([2, 7, 384], low: -1, high: 1, rng: &rng)
        func loss() throws -> Tensor { sum(try bert.forward(batch) * weights) }
        for t in adapter.parameters { t.zeroGrad() }
        try loss().backward()
        let result = try finiteDifferenceCheck(factors, step: 1e-2, samples: 6) {
            Double(try withNoGrad { try loss() }.scalars[0])
        }
        print("xlora trainable experts: gradient check over \(factors.count) factors, worst relative error \(result.worst), missing \(result.missing)")
        #expect(result.missing.isEmpty)
        #expect(!result.worst.isNaN && result.worst < 2e-2, "worst relative error \(result.worst)")
    }

    @Test func fineTuningTrainsExpertsAndClassifierAndReloads() throws {
        let bert = try Assets.loadMiniLM()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-xlora-ttrain-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (train, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        let examples = try ExampleTokenizer.classification(Array(train.prefix(16)), tokenizer: tokenizer, maxLength: 32)
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
        let experts = try XLoRATests.miniLMExperts(classifier, dir: dir + "/experts")
        let model = AdaptedModel(root: classifier, methods: .all)
        let config = try XLoRATests.xloraConfig(experts, ["layerwise_scalings": true, "use_trainable_adapters": true])
        let adapter = try model.addAdapter("x", config: config, seed: 1)
        let members = adapter.layers.compactMap { $0.adapter as? XLoRALayer }.flatMap(\.members)
        let initial = members.map { $0.lora.loraB.scalars }
        let classifierCount = adapter.shared.reduce(0) { $0 + $1.tensor.count }
        #expect(adapter.parameterCount > classifierCount)
        let trainer = try Trainer(model: model, adapterName: "x", objective: SequenceClassificationObjective(model: classifier),
                                  config: TrainerConfig.fullBatch(examples: examples.count, learningRate: 1e-2))
        let before = try trainer.evaluate(examples).loss
        try trainer.train(examples, maxSteps: 8)
        let after = try trainer.evaluate(examples).loss
        let moved = zip(initial, members.map { $0.lora.loraB.scalars }).map { a, b in worstOf(zip(a, b).map { abs($0 - $1) }, empty: 0) }
        print("xlora MiniLM, 8 steps on \(examples.count) tweets, experts + classifier (\(adapter.parameterCount) parameters, classifier \(classifierCount)): loss \(before) -> \(after), experts' B moved up to \(worstOf(moved, empty: 0))")
        #expect(before.isFinite && after.isFinite && after < before - 1e-3, "loss \(before) -> \(after)")
        #expect(moved.allSatisfy { $0 > 1e-4 }, "an expert did not train: \(moved)")

        // The save holds the trained experts; the reload takes them from the file, not the experts' directories.
        let ids = try TokenBatch(sequences: [[101, 7592, 2088, 102], [101, 2023, 2001, 1037, 2204, 102]])
        model.setTraining(false)
        let out = try withNoGrad { try classifier.forward(ids) }
        try model.saveAdapter("x", directory: dir + "/x")
        let file = try SafeTensorsFile(contentsOf: dir + "/x/adapter_model.safetensors")
        #expect(file.names.filter { $0.contains(".lora_A.") }.count == members.count)
        try model.deleteAdapter("x")
        let again = AdaptedModel(root: classifier, methods: .all)
        try again.loadAdapter(directory: dir + "/x")
        let reloaded = try withNoGrad { try classifier.forward(ids) }
        print("xlora trainable experts: reloaded output vs trained, max-abs \(maxAbsDifference(reloaded, out))")
        #expect(maxAbsDifference(reloaded, out) <= 1e-6)
    }
}
