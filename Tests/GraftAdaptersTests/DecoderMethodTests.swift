import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// PEFT's decoder-only tuners on SmolLM2 (issue 14): LLaMA-Adapter, multitask prompt tuning, CPT and Cartridges
/// load PEFT's files, reproduce PEFT's logits (virtual tokens included where PEFT returns them) and save back
/// under PEFT's keys and shapes.
@Suite(.serialized) struct DecoderMethodParityTests {
    static let methods = ["adaption_prompt", "multitask_prompt_tuning", "cpt", "cartridge"]
    static let root = "peft-smollm2-decoder"

    func manifestEntry(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Assets.fixture("\(Self.root)/manifest.json")))
        let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        return ((manifest?["methods"] as? [String: Any])?[name] as? [String: Any]) ?? [:]
    }

    /// The first `cols` vocabulary columns of the logits, as PEFT returns them (`[1, T, cols]`).
    static func logits(_ llama: LlamaModel, cols: Int = 2048) throws -> Tensor {
        let base = try SafeTensorsFile(contentsOf: Assets.fixture("\(root)/base_expected.safetensors"))
        let hidden = try withNoGrad { try llama.hiddenStatesWithVirtualTokens(try fixtureBatch(base)) }
        let t = hidden.shape[1], h = llama.config.hiddenSize
        let full = withNoGrad { llama.lmHead.forward(hidden.reshaped([t, h])) }
        let out = Tensor(zeros: [1, t, cols])
        for i in 0..<t { (out.pointer + i * cols).update(from: full.pointer + i * llama.config.vocabSize, count: cols) }
        return out
    }

    @Test(arguments: methods)
    func logitsMatchPEFT(method: String) throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        let adapter = try model.loadAdapter(directory: Assets.fixture("\(Self.root)/\(method)"))
        try model.setTaskIDs([0])
        let expected = try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/\(method)/expected.safetensors")).tensor("logits_first2048")
        let out = try Self.logits(llama)
        #expect(out.shape == expected.shape, "\(method): shape \(out.shape) vs PEFT's \(expected.shape)")
        let err = maxAbsDifference(out, expected)
        let scale = worstOf(expected.scalars.map(abs), empty: 0)
        let change = (try manifestEntry(method)["max_abs_change_vs_base"] as? Double) ?? 0
        // The fixture's tolerance: 1e-3, or 1e-4 of the output's max-abs where the adapter moves it by more than 10.
        let tolerance = change > 10 ? max(1e-3, 1e-4 * scale) : 1e-3
        print("\(method): max-abs error vs PEFT \(err) (logits up to \(scale), tolerance \(tolerance), \(adapter.parameterCount) trainable)")
        #expect(err <= tolerance, "\(method): max-abs error \(err)")
        #expect(adapter.parameterCount == (try manifestEntry(method)["trainable"] as? Int), "trainable parameter count differs from PEFT's")
        #expect(throws: GraftError.self) { try model.merge("default") }
        let plain = try model.withAdaptersDisabled { try Self.logits(llama) }
        if plain.shape == expected.shape { #expect(maxAbsDifference(plain, expected) > 1e-2, "\(method): the adapter changes nothing") }
    }

    @Test(arguments: methods)
    func saveRoundTripsPEFTKeysAndShapes(method: String) throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        try model.loadAdapter(directory: Assets.fixture("\(Self.root)/\(method)"))
        let before = try Self.logits(llama)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-\(method)-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        try model.deleteAdapter("default")
        let reloaded = AdaptedModel(root: llama)
        try reloaded.loadAdapter(directory: dir)
        #expect(maxAbsDifference(try Self.logits(llama), before) == 0, "\(method): reloaded adapter differs")
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let original = try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/\(method)/adapter_model.safetensors"))
        #expect(Set(saved.names) == Set(original.names), "\(method): saved keys \(saved.names.sorted()) differ from PEFT's \(original.names.sorted())")
        for name in original.names {
            #expect(saved.info(name)?.shape == original.info(name)?.shape, "\(method): \(name) shape")
            #expect(maxAbsDifference(try saved.tensor(name), try original.tensor(name)) == 0, "\(method): \(name) values")
        }
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        let peftConfig = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Assets.fixture("\(Self.root)/\(method)/adapter_config.json")))) as? [String: Any]
        #expect(Set(config?.keys.map { $0 } ?? []) == Set(peftConfig?.keys.map { $0 } ?? []), "\(method): config keys differ from PEFT's")
        try reloaded.deleteAdapter("default")
    }
}

/// A fresh decoder adapter saves a config PEFT builds the causal-LM wrapper from: without `task_type` PEFT's bare
/// `PeftModel` never injects virtual tokens or prefixes (checked in PEFT itself by bench/decoder-peft/check.py).
@Suite(.serialized) struct DecoderMethodConfigTests {
    @Test func savedConfigsNameTheCausalLMTask() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        for type in ["ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE", "PROMPT_TUNING", "PREFIX_TUNING"] {
            guard let factory = AdapterRegistry.moduleFactories[type] else { Issue.record("\(type) not registered"); continue }
            var json = factory.exampleConfig(targets: [])
            json["peft_type"] = type
            try model.addAdapter("a", config: AdapterConfig(json: json, source: type))
            let files = try model.adapterFiles("a")
            let config = try #require(files.first { $0.name == "adapter_config.json" }).bytes
            let object = try JSONSerialization.jsonObject(with: Data(config)) as? [String: Any]
            #expect(object?["task_type"] as? String == "CAUSAL_LM", "\(type): task_type \(String(describing: object?["task_type"]))")
            #expect(object?["peft_type"] as? String == type)
            try model.deleteAdapter("a")
        }
    }
}

/// Analytic gradients of the decoder methods against central differences, on a tiny random Llama with grouped-query
/// heads (4 query heads, 2 key/value heads) and two padded rows of different lengths.
@Suite struct DecoderMethodGradientTests {
    /// A 3-layer Llama, hidden 16, heads 4/2 of width 4, vocabulary 32, random weights.
    static func tinyLlama() throws -> LlamaModel { try tinyRandomLlama(layers: 3, std: 0.3) }

    static let configs: [(String, String)] = [
        ("ADAPTION_PROMPT", #"{"peft_type":"ADAPTION_PROMPT","adapter_len":3,"adapter_layers":2}"#),
        ("MULTITASK_PROMPT_TUNING", #"{"peft_type":"MULTITASK_PROMPT_TUNING","num_virtual_tokens":3,"num_tasks":2,"num_ranks":2}"#),
        // Wide projection balls, so the central differences stay inside them (the projection is checked below).
        ("CPT", #"{"peft_type":"CPT","cpt_token_ids":[1,2,3,4],"cpt_tokens_type_mask":[1,2,4,3],"opt_projection_epsilon":400,"opt_projection_format_epsilon":400}"#),
        ("CARTRIDGE", #"{"peft_type":"CARTRIDGE","num_virtual_tokens":3,"num_frozen_tokens":1}"#),
    ]

    @Test(arguments: configs.map(\.0))
    func gradientsMatchFiniteDifferences(method: String) throws {
        let llama = try Self.tinyLlama()
        let model = AdaptedModel(root: llama)
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        try model.setTaskIDs([1, 0])
        var rng = GraftRNG(seed: 8)
        for (_, p) in adapter.peftStateDict {
            for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() }
        }
        let batch = try TokenBatch(sequences: [[3, 7, 11, 5], [9, 2, 6]])
        let shape = try withNoGrad { try llama.hiddenStatesWithVirtualTokens(batch) }.shape
        let w = Tensor.randomNormal(shape, rng: &rng)
        // The objective reads real positions only: row 1's last position is padding.
        let (t, h) = (shape[1], shape[2])
        for j in 0..<h { w.pointer[(t + t - 1) * h + j] = 0 }
        func value() throws -> Double {
            let out = try withNoGrad { try llama.hiddenStatesWithVirtualTokens(batch) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let loss = sum(try llama.hiddenStatesWithVirtualTokens(batch) * w)
        #expect(loss.item.isFinite, "\(method): objective \(loss.item)")
        loss.backward()
        // Virtual tokens enter below every layer of this small, strongly curved toy: central differences carry an
        // h² truncation error of a few percent at h = 1e-2 (it falls 4× per halving of h), so the check compares
        // against Richardson's extrapolation (4·D(h/2) − D(h)) / 3, which cancels it, rather than a smaller step
        // that float32 rounding would swamp.
        var worst = 0.0, missing: [String] = []
        for (key, p) in adapter.peftStateDict {
            guard let grad = p.grad else { missing.append(key); continue }
            for i in stride(from: 0, to: p.count, by: max(1, p.count / 40)) {
                let saved = p.pointer[i]
                func slope(_ h: Float) throws -> Double {
                    p.pointer[i] = saved + h
                    let up = try value()
                    p.pointer[i] = saved - h
                    let down = try value()
                    p.pointer[i] = saved
                    return (up - down) / Double(2 * h)
                }
                let numeric = (4 * (try slope(5e-3)) - (try slope(1e-2))) / 3
                let error = abs(Double(grad.pointer[i]) - numeric) / max(1, abs(numeric))
                if error > 2e-3 { print("gradient mismatch \(key)[\(i)]: analytic \(grad.pointer[i]) numeric \(numeric)") }
                worst = worse(worst, error)
            }
        }
        #expect(missing.isEmpty, "\(method): no gradient for \(missing)")
        #expect(worst < 5e-3, "\(method): worst gradient error \(worst)")  // PromptGradientTests' bar
        print("\(method): worst gradient error \(worst) (Richardson-extrapolated central differences) over \(adapter.parameterCount) trainable")
        if method == "CPT", let grad = adapter.peftStateDict.first?.tensor.grad {
            // The label-type row (type 4) does not train, as PEFT masks its gradient.
            #expect((0..<16).allSatisfy { grad.pointer[2 * 16 + $0] == 0 })
        }
    }

    /// CPT keeps each row of its trained change inside its ball (`ε · √(d / 2048)` by token type), as PEFT's
    /// projection, and saves `E + δ` as PEFT's `prompt_embeddings`.
    @Test func cptProjectsItsChangeIntoTheBall() throws {
        let llama = try Self.tinyLlama()
        let model = AdaptedModel(root: llama)
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: #"{"peft_type":"CPT","cpt_token_ids":[1,2,3],"cpt_tokens_type_mask":[1,2,3],"opt_projection_epsilon":0.2,"opt_projection_format_epsilon":0.4}"#, source: "cpt"))
        let layer = try #require(adapter.modules.first?.adapter as? CPTLayer)
        for i in 0..<layer.delta.count { layer.delta.pointer[i] = 1 }
        _ = try withNoGrad { try llama.hiddenStates(try TokenBatch(sequences: [[3, 4]])) }
        let scale = (16.0 / 2048).squareRoot()
        for (row, eps) in [0.4, 0.2, 0.4].enumerated() {
            let norm = (0..<16).reduce(0.0) { $0 + Double(layer.delta.pointer[row * 16 + $1] * layer.delta.pointer[row * 16 + $1]) }.squareRoot()
            #expect(abs(norm - eps * scale) < 1e-5, "row \(row): norm \(norm), ball \(eps * scale)")
        }
        // Token embeddings of cpt_token_ids plus the change.
        let saved = try #require(adapter.peftExportDict.first { $0.key == "prompt_embeddings" }?.tensor)
        let e = llama.embedTokens.weight
        #expect(abs(saved.pointer[16 + 3] - (e.pointer[2 * 16 + 3] + layer.delta.pointer[16 + 3])) < 1e-6)
    }
}
