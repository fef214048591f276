import Foundation
import Graft
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// Activated LoRA (`alora_invocation_tokens`) against PEFT on SmolLM2 (scripts/fixtures/peft-smollm2-lora-options.py):
/// logits per row (the invocation once, twice, never), greedy generation, saving, and what it refuses.
@Suite(.serialized) struct ALoRATests {
    static let root = "peft-smollm2-lora-options/alora"
    static let columns = 512

    func expected() throws -> SafeTensorsFile { try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/expected.safetensors")) }

    func manifest() throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Assets.fixture("peft-smollm2-lora-options/manifest.json")))
        let json = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        return ((json?["methods"] as? [String: Any])?["alora"] as? [String: Any]) ?? [:]
    }

    func logits(_ llama: LlamaModel, _ batch: TokenBatch) throws -> Tensor { try firstLogitColumns(llama, batch) }

    func rowMaxAbs(_ a: Tensor, _ b: Tensor, row: Int) -> Float {
        let n = a.count / a.shape[0]
        return worstOf((0..<n).map { abs(a.pointer[row * n + $0] - b.pointer[row * n + $0]) }, empty: 0)
    }

    @Test func logitsAndGenerationMatchPEFT() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        let adapter = try model.loadAdapter(directory: Assets.fixture(Self.root))
        let file = try expected()
        let batch = try fixtureBatch(file)
        let want = try file.tensor("logits_first\(Self.columns)")
        let out = try logits(llama, batch)
        let plain = try model.withAdaptersDisabled { try logits(llama, batch) }
        let error = maxAbsDifference(out, want)
        print("aLoRA: max-abs error vs PEFT \(error) over 3 rows; per-row change vs base \((0..<3).map { rowMaxAbs(want, plain, row: $0) }); \(adapter.parameterCount) trainable")
        // Relative to the logits' scale (up to ~30): float32 rounding through 30 layers differs across BLAS kernels.
        let scale = max(1, worstOf(want.scalars.map(abs), empty: 0))
        #expect(error <= 1e-5 * scale, "aLoRA logits differ from PEFT's by \(error) (largest logit \(scale))")
        #expect(adapter.parameterCount == (try manifest()["trainable"] as? Int))
        // Rows 0 and 1 hold the invocation (the adapter acts from it on), row 2 does not (the base model).
        #expect(rowMaxAbs(want, plain, row: 0) > 0.1 && rowMaxAbs(want, plain, row: 1) > 0.1)
        #expect(rowMaxAbs(out, plain, row: 2) == 0, "a row without the invocation must be the base model")
        // Before the invocation every row is the base model (the KV cache there is interchangeable with the base's).
        let first = try ALoRAActivation.invocationTokens(adapter.config) ?? []
        let row0 = Array(batch.row(0))
        if let start = (0...(row0.count - first.count)).last(where: { Array(row0[$0..<($0 + first.count)]) == first }) {
            let n = start * Self.columns
            #expect(worstOf((0..<n).map { abs(out.pointer[$0] - plain.pointer[$0]) }, empty: 0) == 0)
        } else {
            Issue.record("row 0 of the fixture lacks the invocation")
        }

        // Greedy generation: the prompt ends with the invocation, so the adapter acts on it and every new token.
        let prompt = try file.int64s("generate_prompt").map { Int32($0) }
        let tokens = try file.int64s("generate_tokens").map { Int32($0) }
        let generated = try llama.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: tokens.count))
        print("aLoRA: generated \(generated), PEFT \(tokens)")
        #expect(generated == tokens)
        let batched = try llama.generate(prompts: [prompt, Array(prompt.prefix(4))], parameters: GenerationParameters(maxNewTokens: tokens.count))
        #expect(batched[0] == tokens, "batched generation (a cache per row) gives the same tokens")
        let base = try model.withAdaptersDisabled { try llama.generate(prompt: Array(prompt.prefix(4)), parameters: GenerationParameters(maxNewTokens: tokens.count)) }
        #expect(batched[1] == base, "a prompt without the invocation generates as the base model")
    }

    @Test func savesPEFTKeysAndConfigAndRefusesMerging() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        try model.loadAdapter(directory: Assets.fixture(Self.root))
        let batch = try fixtureBatch(try expected())
        let before = try logits(llama, batch)
        do {
            try model.merge("default")
            Issue.record("aLoRA merged")
        } catch let e as GraftError {
            #expect(e.message.contains("aLoRA"), "\(e.message)")
        }
        #expect(throws: GraftError.self) { try model.addWeightedAdapter("sum", combining: AdapterCombination(adapters: ["default"], weights: [1], type: .linear)) }
        #expect(throws: GraftError.self) { try MixedAdapterBatch.checkMixable(model, ids: [0]) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-alora-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        try model.deleteAdapter("default")
        #expect(llama.tokenObservers.isEmpty, "deleting the adapter removes its activation")
        let reloaded = AdaptedModel(root: llama)
        try reloaded.loadAdapter(directory: dir)
        #expect(maxAbsDifference(try logits(llama, batch), before) == 0)
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let original = try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/adapter_model.safetensors"))
        #expect(Set(saved.names) == Set(original.names))
        for name in original.names { #expect(saved.info(name)?.shape == original.info(name)?.shape, "\(name)") }
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        #expect((config?["alora_invocation_tokens"] as? [Int]) == [1, 520, 9531, 198])
        #expect((config?["task_type"] as? String) == "CAUSAL_LM")
    }

    @Test func refusesWhatItCannotDoByName() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        let cases: [([String: Any], String)] = [
            (["target_modules": ["lm_head"]], "outside"),
            (["target_modules": ["q_proj"], "use_dora": true], "use_dora"),
            (["target_modules": ["q_proj"], "kasa_config": ["beta": 0.1]], "kasa_config"),
            (["target_modules": ["q_proj"], "init_lora_weights": "olora"], "init_lora_weights"),
            (["target_modules": ["q_proj"], "train_a": false], "train_a"),
            (["target_modules": ["q_proj"], "alora_invocation_tokens": [Int]()], "non-empty"),
            (["target_modules": ["q_proj"], "alora_invocation_tokens": [-3]], "not a token id"),
        ]
        for (extra, fragment) in cases {
            var json: [String: Any] = ["peft_type": "LORA", "r": 2, "alora_invocation_tokens": [1, 2]]
            json.merge(extra) { $1 }
            do {
                try model.addAdapter("a", config: AdapterConfig(json: json, source: "alora"))
                Issue.record("accepted \(extra)")
            } catch let e as GraftError {
                #expect(e.message.contains(fragment), "\(e.message)")
            }
        }
        #expect(llama.tokenObservers.isEmpty)
        let bert = AdaptedModel(root: try Assets.loadMiniLM())
        do {
            try bert.addAdapter("a", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["query"],
                                                              "alora_invocation_tokens": [101]], source: "alora"))
            Issue.record("aLoRA accepted on BERT")
        } catch let e as GraftError {
            #expect(e.message.contains("causal decoder"), "\(e.message)")
        }
    }

    /// A one-layer decoder stand-in: its Linear sees `[batch, length, in]` rows after the observers ran.
    final class ToyDecoder: Module, TokenObserverHost {
        var tokenObservers: [any TokenObserver] = []
        var tokenAlignedPrefix: String { "model.layers." }
        let proj: Linear
        init(proj: Linear) {
            self.proj = proj
            super.init(typeName: "Toy")
            register("model", ModuleList(typeName: "M", [("layers", ModuleList.numbered([ModuleList(typeName: "L", [("proj", proj)])]))]))
        }
        func run(_ batch: TokenBatch, _ x: Tensor, caches: [KVCache?]? = nil) -> Tensor {
            for o in tokenObservers where o.isEnabled { o.willRun(batch, caches: caches ?? [KVCache?](repeating: nil, count: batch.batchSize)) }
            return proj.forward(x)
        }
    }

    @Test func gatesPerPackedSequenceAndGradientsMatchFiniteDifferences() throws {
        var rng = GraftRNG(seed: 5)
        let proj = Linear(weight: Tensor.randomNormal([6, 5], std: 0.5, rng: &rng), bias: nil)
        let toy = ToyDecoder(proj: proj)
        let model = AdaptedModel(root: toy)
        let adapter = try model.addAdapter("a", config: AdapterConfig(json: ["peft_type": "LORA", "r": 3, "lora_alpha": 6, "lora_bias": true,
                                                                            "init_lora_weights": false, "target_modules": ["proj"],
                                                                            "alora_invocation_tokens": [7, 8]], source: "alora"))
        // One packed row: sequence A = [1 7 8 2 7 8 3] (last invocation at 4), sequence B = [4 5 6] (none),
        // sequence C = [7 8] (at 0).
        let ids: [Int32] = [1, 7, 8, 2, 7, 8, 3, 4, 5, 6, 7, 8]
        let segments: [Int32] = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
        let batch = try TokenBatch(ids: ids, batchSize: 1, length: ids.count, segments: segments)
        let x = Tensor.randomNormal([1, ids.count, 5], rng: &rng).requiringGrad()
        let base = withNoGrad { proj.baseForward(x.detached()) }
        let out = withNoGrad { toy.run(batch, x.detached()) }
        let active = (0..<ids.count).map { t in (0..<6).contains { abs(out.pointer[t * 6 + $0] - base.pointer[t * 6 + $0]) > 0 } }
        #expect(active == [false, false, false, false, true, true, true, false, false, false, true, true], "\(active)")
        // Continuing a cached sequence: every token iff the prompt held the invocation.
        let cache = KVCache(layerCount: 1)
        let prompt = try TokenBatch(ids: [3, 7, 8], batchSize: 1, length: 3)
        _ = withNoGrad { toy.run(prompt, Tensor.randomNormal([1, 3, 5], rng: &rng), caches: [cache]) }
        #expect(cache.adapterMarks.values.first == 1)

        let w = Tensor.randomNormal([1, ids.count, 6], rng: &rng)
        func objective() -> Double {
            zip(withNoGrad { toy.run(batch, x.detached()) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let loss = sum(toy.run(batch, x) * w)
        #expect(loss.item.isFinite)
        loss.backward()
        let check = finiteDifferenceCheck(adapter.peftStateDict + [("input", x)], step: 1e-2, relativeStep: true, value: objective)
        print("aLoRA: gradient check worst relative error \(check.worst)")
        #expect(check.missing.isEmpty && check.worst <= 1e-3, "worst \(check.worst), missing \(check.missing)")
    }

    @Test func fineTuneLowersTheLossFromTheInvocationOn() throws {
        let (llama, tokenizer, examples) = try smolLM2TweetCompletions(count: 4)
        let invocation = tokenizer.encode("Sentiment:", addSpecialTokens: false)
        let model = AdaptedModel(root: llama)
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: [
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
            "alora_invocation_tokens": invocation.map(Int.init)], source: "alora"), seed: 1)
        let config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 1e-2)
        let trainer = try Trainer(model: model, adapterName: "default", objective: CausalLMObjective(model: llama), config: config)
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: model.needsPaddedBatches)
        for _ in 0..<4 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
        print("aLoRA: fine-tune loss \(String(format: "%.4f", before)) -> \(String(format: "%.4f", after)) in 4 steps on \(examples.count) demo tweets (\(adapter.parameterCount) trainable)")
        #expect(before.isFinite && after < before - 1e-3, "the training loss went \(before) -> \(after)")
        // The prompt before the invocation is still the base model's.
        let probe = try TokenBatch(sequences: [tokenizer.encode("Tweet: what a day", addSpecialTokens: false)])
        let adapted = try withNoGrad { try llama.hiddenStates(probe) }
        let plain = try model.withAdaptersDisabled { try withNoGrad { try llama.hiddenStates(probe) } }
        #expect(maxAbsDifference(adapted, plain) == 0)
    }
}
