import Foundation
import Graft
import GraftTestSupport
import Testing

/// PEFT's decoder-only tuners (LLaMA-Adapter, multitask prompt tuning, CPT, Cartridges), each with the config
/// `graft methods` shows as its example, fine-tuned for a few steps on demo tweets as `"Tweet: …\nSentiment:"` →
/// label completions on SmolLM2: their trainable parameters alone must lower the causal-LM loss.
@Suite(.serialized) struct DecoderMethodFineTuneTests {
    static let steps = 6

    @Test(arguments: ["ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE"])
    func lowersTheLossOnTheDemoTweets(type: String) throws {
        let (llama, _, examples) = try smolLM2TweetCompletions(count: 4)
        guard let factory = AdapterRegistry.moduleFactories[type] else {
            Issue.record("\(type) is not registered")
            return
        }
        var json = factory.exampleConfig(targets: [])
        json["peft_type"] = type
        let model = AdaptedModel(root: llama)
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: json, source: type), seed: 1)
        let config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 1e-2)
        let trainer = try Trainer(model: model, adapterName: "default", objective: CausalLMObjective(model: llama), config: config)
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: model.needsPaddedBatches)
        for _ in 0..<Self.steps {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
        print("\(type): fine-tune loss \(String(format: "%.4f", before)) -> \(String(format: "%.4f", after)) in \(Self.steps) steps on \(examples.count) demo tweets (\(adapter.parameterCount) trainable)")
        #expect(before.isFinite && after < before - 1e-3, "\(type): the training loss went \(before) -> \(after)")
        if let root = ProcessInfo.processInfo.environment["GRAFT_DECODER_EXPORT"] {
            // For bench/decoder-peft/check.py: the trained adapter as saved, and Graft's logits on the fixture.
            let dir = root + "/" + type.lowercased()
            try model.saveAdapter("default", directory: dir + "/adapter")
            let base = try SafeTensorsFile(contentsOf: Assets.fixture("peft-smollm2-decoder/base_expected.safetensors"))
            let hidden = try withNoGrad { try llama.hiddenStatesWithVirtualTokens(try fixtureBatch(base)) }
            let t = hidden.shape[1]
            let logits = withNoGrad { llama.lmHead.forward(hidden.reshaped([t, llama.config.hiddenSize])) }
            var writer = SafeTensorsWriter()
            try writer.add("logits", logits.reshaped([1, t, llama.config.vocabSize]))
            try Data(writer.serialized()).write(to: URL(fileURLWithPath: dir + "/graft_logits.safetensors"))
        }
    }
}
