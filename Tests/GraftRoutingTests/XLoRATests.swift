import Foundation
import Testing
@testable import Graft
@testable import GraftRouting
import GraftTestSupport

/// X-LoRA (`XLORA`, issue 14): PEFT's checkpoints load and reproduce PEFT's logits and scalings on SmolLM2, the
/// classifier's gradients match finite differences, training it lowers the loss, saves keep PEFT's keys and
/// shapes, and X-LoRA rows mix with other adapters in one batch.
@Suite(.serialized) struct XLoRATests {
    static let cases = ["layerwise", "deep_topk"]
    static let root = "peft-xlora/smollm2"

    /// The first 1024 vocabulary columns of the logits on the SmolLM2 fixture sentence, `[1, T, 1024]`.
    static func logits(_ llama: LlamaModel, cols: Int = 1024) throws -> Tensor {
        let base = try SafeTensorsFile(contentsOf: Assets.fixture("smollm2/base_expected.safetensors"))
        let hidden = try withNoGrad { try llama.hiddenStates(try fixtureBatch(base)) }
        let t = hidden.shape[1], h = llama.config.hiddenSize
        let full = withNoGrad { llama.lmHead.forward(hidden.reshaped([t, h])) }
        let out = Tensor(zeros: [1, t, cols])
        for i in 0..<t { (out.pointer + i * cols).update(from: full.pointer + i * llama.config.vocabSize, count: cols) }
        return out
    }

    static func manifest(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Assets.fixture("peft-xlora/manifest.json")))
        let m = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        let cases = ((m?["models"] as? [String: Any])?["smollm2"] as? [String: Any])?["cases"] as? [String: Any]
        return cases?[name] as? [String: Any] ?? [:]
    }

    @Test(arguments: cases)
    func logitsAndScalingsMatchPEFT(name: String) throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama, methods: .all)
        let adapter = try model.loadAdapter(directory: Assets.fixture("\(Self.root)/\(name)"))
        let expected = try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/\(name)/expected.safetensors"))
        let out = try Self.logits(llama)
        let want = try expected.tensor("output")
        #expect(out.shape == want.shape)
        let err = maxAbsDifference(out, want)
        let scale = worstOf(want.scalars.map(abs), empty: 0)
        // The catalog's tolerance: 1e-4 max-abs, or 1e-5 of the output's max-abs where it exceeds 10.
        let tolerance = max(1e-4, scale > 10 ? 1e-5 * scale : 0)
        let scalings = try #require(XLoRAFactory.latestScalings(adapter))
        let wantScalings = try expected.tensor("scalings")
        #expect(scalings.shape == wantScalings.shape)
        let scalingErr = maxAbsDifference(scalings, wantScalings)
        // The same measure on the base model: how far Graft's SmolLM2 is from transformers' before any adapter.
        let base = try SafeTensorsFile(contentsOf: Assets.fixture("smollm2/base_expected.safetensors")).tensor("logits_first2048")
        let plain = try model.withAdaptersDisabled { try Self.logits(llama) }
        var baseErr: Float = 0
        for i in 0..<plain.count { baseErr = worse(baseErr, abs(plain.pointer[i] - base.pointer[(i / 1024) * 2048 + i % 1024])) }
        print("xlora \(name): logits max-abs error vs PEFT \(err) (logits up to \(scale), tolerance \(tolerance); base model alone \(baseErr)), scalings \(scalingErr), \(adapter.parameterCount) trainable")
        #expect(err <= tolerance, "\(name): logits max-abs error \(err)")
        #expect(scalingErr <= 1e-4, "\(name): scalings max-abs error \(scalingErr)")
        #expect(adapter.parameterCount == (try Self.manifest(name)["trainable"] as? Int))
        #expect(maxAbsDifference(plain, out) > 1, "\(name): X-LoRA changes nothing")
        #expect(throws: GraftError.self) { try model.merge("default") }
    }

    @Test func saveKeepsPEFTKeysAndShapesAndReloads() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama, methods: .all)
        let source = Assets.fixture("\(Self.root)/deep_topk")
        try model.loadAdapter(directory: source)
        let before = try Self.logits(llama)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-xlora-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let peft = try SafeTensorsFile(contentsOf: source + "/adapter_model.safetensors")
        let ours = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        #expect(Set(ours.names) == Set(peft.names))
        for key in peft.names { #expect(ours.info(key)?.shape == peft.info(key)?.shape, "\(key)") }
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        #expect(config?["peft_type"] as? String == "XLORA")
        #expect((config?["adapters"] as? [String: String])?.values.allSatisfy { $0.hasPrefix("/") } == true)
        let again = AdaptedModel(root: llama, methods: .all)
        try model.deleteAdapter("default")
        #expect(llama.forwardHooks.isEmpty, "deleting the adapter leaves its scaling pass installed")
        try again.loadAdapter(directory: dir)
        #expect(maxAbsDifference(try Self.logits(llama), before) == 0)
    }

    /// Decoding with a KV cache continues the scaling pass with a cache of its own: the last token's states equal
    /// the full pass's (PEFT's X-LoRA generates without a cache, recomputing everything).
    @Test func cachedDecodingMatchesTheFullPass() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama, methods: .all)
        try model.loadAdapter(directory: Assets.fixture("\(Self.root)/layerwise"))
        let ids = try fixtureBatch(try SafeTensorsFile(contentsOf: Assets.fixture("smollm2/base_expected.safetensors"))).ids
        let n = ids.count, h = llama.config.hiddenSize
        let full = try withNoGrad { try llama.hiddenStates(try TokenBatch(ids: ids, batchSize: 1, length: n)) }
        let cache = KVCache(layerCount: llama.config.layers)
        _ = try withNoGrad { try llama.hiddenStates(try TokenBatch(ids: Array(ids[0..<(n - 1)]), batchSize: 1, length: n - 1), cache: cache) }
        let step = try withNoGrad { try llama.hiddenStates(try TokenBatch(ids: [ids[n - 1]], batchSize: 1, length: 1), cache: cache) }
        var worst: Float = 0
        for c in 0..<h { worst = worse(worst, abs(step.pointer[c] - full.pointer[(n - 1) * h + c])) }
        print("xlora cached decoding: last token's hidden state vs the full pass, max-abs \(worst)")
        #expect(worst <= 1e-4)
        // A cache the scaling pass never saw from its first token is refused, not guessed.
        let foreign = KVCache(layerCount: llama.config.layers)
        try model.withAdaptersDisabled { _ = try withNoGrad { try llama.hiddenStates(try TokenBatch(ids: [ids[0]], batchSize: 1, length: 1), cache: foreign) } }
        #expect(throws: GraftError.self) { _ = try withNoGrad { try llama.hiddenStates(try TokenBatch(ids: [ids[1]], batchSize: 1, length: 1), cache: foreign) } }
    }

    /// Three LoRA experts made by Graft on MiniLM (random non-zero factors), saved as PEFT directories under `dir`.
    static func miniLMExperts(_ bert: Module, dir: String) throws -> [String: String] {
        let model = AdaptedModel(root: bert)
        let specs: [[String: Any]] = [
            ["r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "layers_to_transform": [0, 1]],
            ["r": 2, "lora_alpha": 4, "target_modules": ["value", "output.dense"], "layers_to_transform": [1, 2]],
            ["r": 2, "lora_alpha": 2, "target_modules": ["key", "intermediate.dense"], "layers_to_transform": [0, 5], "use_rslora": true],
        ]
        var out: [String: String] = [:]
        for (i, spec) in specs.enumerated() {
            var json = spec
            json["peft_type"] = "LORA"
            json["init_lora_weights"] = false
            try model.addAdapter("e\(i)", config: AdapterConfig(json: json, source: "expert \(i)"), seed: UInt64(10 + i))
            try model.saveAdapter("e\(i)", directory: dir + "/\(i)")
            try model.deleteAdapter("e\(i)")
            out["\(i)"] = dir + "/\(i)"
        }
        return out
    }

    static func xloraConfig(_ experts: [String: String], _ extra: [String: Any]) throws -> AdapterConfig {
        var json: [String: Any] = ["peft_type": "XLORA", "adapters": experts, "hidden_size": 384, "xlora_dropout_p": 0.0]
        for (k, v) in extra { json[k] = v }
        return try AdapterConfig(json: json, source: "xlora test")
    }

    @Test(arguments: [0, 1])
    func classifierGradientsMatchFiniteDifferences(variant: Int) throws {
        let bert = try Assets.loadMiniLM()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-xlora-grad-\(getpid())-\(variant)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let experts = try Self.miniLMExperts(bert, dir: dir)
        let extra: [String: Any] = variant == 0
            ? ["layerwise_scalings": true, "xlora_depth": 2, "xlora_size": 8, "softmax_temperature": 0.7, "scaling_pass_value": 0.3]
            : ["xlora_depth": 1, "top_k_lora": 2, "enable_softmax": false, "enable_softmax_topk": true, "global_scaling_weight": 1.5]
        let model = AdaptedModel(root: bert, methods: .all)
        let adapter = try model.addAdapter("x", config: try Self.xloraConfig(experts, extra), seed: 3)
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 1037, 2204, 2154, 102]])
        var rng = GraftRNG(seed: 7)
        let weights = Tensor.randomUniform([2, 7, 384], low: -1, high: 1, rng: &rng)
        func loss() throws -> Tensor { sum(try bert.forward(batch) * weights) }
        let params = adapter.shared.map { (key: $0.key, tensor: $0.tensor) }
        for (_, t) in params { t.zeroGrad() }
        try loss().backward()
        let result = try finiteDifferenceCheck(params, step: 1e-2, samples: 12, skipKinks: variant == 1) {
            Double(try withNoGrad { try loss() }.scalars[0])
        }
        print("xlora gradient check (variant \(variant)): worst relative error \(result.worst), missing \(result.missing), kinks \(result.kinks)")
        #expect(result.missing.isEmpty)
        #expect(!result.worst.isNaN && result.worst < 2e-2, "worst relative error \(result.worst)")
    }

    @Test func fineTuningTheClassifierLowersTheLoss() throws {
        let bert = try Assets.loadMiniLM()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-xlora-train-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (train, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        let examples = try ExampleTokenizer.classification(Array(train.prefix(16)), tokenizer: tokenizer, maxLength: 32)
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
        let experts = try Self.miniLMExperts(classifier, dir: dir)
        let model = AdaptedModel(root: classifier, methods: .all)
        let adapter = try model.addAdapter("x", config: try Self.xloraConfig(experts, ["layerwise_scalings": true]), seed: 1)
        let frozen = adapter.layers.compactMap { $0.adapter as? XLoRALayer }.flatMap(\.members).map { $0.lora.loraA.scalars }
        let config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 1e-2)
        let trainer = try Trainer(model: model, adapterName: "x", objective: SequenceClassificationObjective(model: classifier), config: config)
        let before = try trainer.evaluate(examples).loss
        try trainer.train(examples, maxSteps: 8)
        let after = try trainer.evaluate(examples).loss
        print("xlora MiniLM, 8 steps on \(examples.count) tweets, classifier only (\(adapter.parameterCount) parameters): loss \(before) -> \(after)")
        #expect(before.isFinite && after.isFinite)
        #expect(after < before - 1e-3, "loss \(before) -> \(after)")
        let now = adapter.layers.compactMap { $0.adapter as? XLoRALayer }.flatMap(\.members).map { $0.lora.loraA.scalars }
        #expect(now == frozen, "the LoRA experts moved")
    }

    /// On SmolLM2 over PEFT's own experts (the fixture's layer-wise X-LoRA): training the classifier alone lowers the
    /// causal-LM loss of `"Tweet: …\nSentiment:"` → label completions; the experts do not move.
    @Test func fineTuningOnSmolLM2LowersTheLoss() throws {
        let (llama, _, examples) = try smolLM2TweetCompletions(count: 4)
        let model = AdaptedModel(root: llama, methods: .all)
        let adapter = try model.loadAdapter(directory: Assets.fixture("\(Self.root)/layerwise"))
        let frozen = adapter.layers.compactMap { $0.adapter as? XLoRALayer }.flatMap(\.members).map { $0.lora.loraB.scalars }
        let config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 1e-2)
        let trainer = try Trainer(model: model, adapterName: "default", objective: CausalLMObjective(model: llama), config: config)
        let before = try trainer.evaluate(examples).loss
        try trainer.train(examples, maxSteps: 6)
        let after = try trainer.evaluate(examples).loss
        print("xlora SmolLM2, 6 steps on \(examples.count) demo tweets, classifier only (\(adapter.parameterCount) parameters): loss \(before) -> \(after)")
        #expect(before.isFinite && after.isFinite && after < before - 1e-3, "loss \(before) -> \(after)")
        let now = adapter.layers.compactMap { $0.adapter as? XLoRALayer }.flatMap(\.members).map { $0.lora.loraB.scalars }
        #expect(now == frozen, "the LoRA experts moved")
    }

    @Test func mixedBatchRowsMatchEachRowAlone() throws {
        let bert = try Assets.loadMiniLM()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-xlora-mixed-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let experts = try Self.miniLMExperts(bert, dir: dir)
        let model = AdaptedModel(root: bert, methods: .all)
        try model.addAdapter("lora", config: AdapterConfig(json: ["peft_type": "LORA", "r": 4, "init_lora_weights": false,
                                                                   "target_modules": ["query", "value"]], source: "lora"), seed: 5)
        try model.addAdapter("x", config: try Self.xloraConfig(experts, ["layerwise_scalings": true, "top_k_lora": 2]), seed: 2)
        let sequences: [[Int32]] = [[101, 7592, 2088, 102], [101, 2023, 2001, 1037, 2204, 102], [101, 2307, 2154, 999, 102], [101, 4931, 102]]
        let ids: [Int32] = [1, 1, 0, -1]
        let batch = try TokenBatch(sequences: sequences)
        let mixed = try MixedAdapterBatch.withRouting(model, ids: ids) { try bert.forward(batch) }
        var worst: Float = 0
        for (r, seq) in sequences.enumerated() {
            let alone: Tensor
            if ids[r] < 0 {
                alone = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(try TokenBatch(sequences: [seq])) } }
            } else {
                try model.setActiveAdapter(ids[r] == 0 ? "lora" : "x")
                alone = try withNoGrad { try bert.forward(try TokenBatch(sequences: [seq])) }
            }
            for t in 0..<seq.count {
                for c in 0..<384 {
                    worst = worse(worst, abs(mixed.pointer[(r * batch.length + t) * 384 + c] - alone.pointer[t * 384 + c]))
                }
            }
        }
        print("xlora in a mixed batch (X-LoRA, X-LoRA, LoRA, base rows): worst row difference vs alone \(worst)")
        #expect(worst <= 1e-5)
    }

    @Test func configErrorsNameTheKey() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert, methods: .all)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-xlora-config-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let experts = try Self.miniLMExperts(bert, dir: dir)
        let bad: [([String: Any], String)] = [
            (["top_k_lora": 4], "top_k_lora"), (["softmax_temperature": 0], "softmax_temperature"),
            (["xlora_depth": 0], "xlora_depth"), (["use_trainable_adapters": "yes"], "use_trainable_adapters"),
            (["hidden_size": 576], "hidden_size"), (["no_such_key": 3], "no_such_key"),
        ]
        for (extra, key) in bad {
            do {
                try model.addAdapter("x", config: try Self.xloraConfig(experts, extra))
                Issue.record("\(extra) was accepted")
                try model.deleteAdapter("x")
            } catch let e as GraftError {
                #expect(e.message.contains(key), "\(e.message)")
            }
        }
        do {
            try model.addAdapter("x", config: try Self.xloraConfig(["0": dir + "/missing"], [:]))
            Issue.record("a missing expert was accepted")
        } catch let e as GraftError {
            #expect(e.message.contains("missing"), "\(e.message)")
        }
        #expect(bert.forwardHooks.isEmpty)
    }
}
