import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// PEFT's own adapter files, loaded into Graft, must reproduce PEFT's outputs (fixtures from peft 0.21.2).
@Suite(.serialized) struct LoRAParityTests {
    static let encoderFixtures = ["lora", "lora_all_linear_rslora", "lora_rank_pattern", "lora_layers_to_transform", "dora"]

    @Test(arguments: encoderFixtures)
    func encoderOutputMatchesPEFT(fixture name: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.loadAdapter(directory: Assets.fixture("peft-minilm/\(name)"))
        let base = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
        let expected = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/\(name)/expected.safetensors")).tensor("last_hidden_state")
        let out = try withNoGrad { try bert.forward(try fixtureBatch(base)) }
        let err = maxAbsDifference(out, expected)
        print("\(name): max-abs error vs PEFT \(err) (\(adapter.layers.count) adapted layers, \(adapter.parameterCount) parameters)")
        #expect(err <= 1e-4)
        let plain = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(try fixtureBatch(base)) } }
        #expect(maxAbsDifference(plain, expected) > 1e-3, "disabling the adapter must change the output")
    }

    @Test func sequenceClassificationLogitsMatchPEFT() throws {
        let cls = try BertForSequenceClassification(bert: try Assets.loadMiniLM(), numLabels: 3)
        let model = AdaptedModel(root: cls)
        let adapter = try model.loadAdapter(directory: Assets.fixture("peft-minilm/lora_seq_cls"))
        #expect(adapter.savedModules.map(\.path) == ["classifier"])
        let base = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
        let expected = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/lora_seq_cls/expected.safetensors")).tensor("logits")
        let logits = try withNoGrad { try cls.forward(try fixtureBatch(base)) }
        let err = maxAbsDifference(logits, expected)
        print("lora_seq_cls: logits max-abs error vs PEFT \(err)")
        #expect(logits.shape == [2, 3])
        #expect(err <= 1e-4)
    }

    @Test(arguments: ["lora", "dora", "lora_seq_cls"])
    func mergedAndUnmergedOutputsAgree(fixture name: String) throws {
        let bert = try Assets.loadMiniLM()
        let root: Module = name == "lora_seq_cls" ? try BertForSequenceClassification(bert: bert, numLabels: 3) : bert
        let forward: () throws -> Tensor = {
            if let cls = root as? BertForSequenceClassification { return try cls.forward(try fixtureBatch(Self.baseFile())) }
            return try bert.forward(try fixtureBatch(Self.baseFile()))
        }
        let model = AdaptedModel(root: root)
        try model.loadAdapter(directory: Assets.fixture("peft-minilm/\(name)"))
        let originalQuery = bert.layers[0].query.weight.copy()
        let unmerged = try withNoGrad(forward)
        try model.merge("default")
        let merged = try withNoGrad(forward)
        // Relative to the output's scale, as MethodParityTests bounds every method's merge: merging reorders float32
        // sums (DoRA's merged output moved by 1.29e-5 of outputs up to 5.8 on an AVX-512 CPU).
        let scale = max(1, unmerged.scalars.map(abs).max() ?? 1)
        #expect(maxAbsDifference(merged, unmerged) <= 2e-5 * scale)
        try model.unmerge("default")
        let again = try withNoGrad(forward)
        #expect(maxAbsDifference(again, unmerged) <= 2e-5 * scale)
        #expect(maxAbsDifference(bert.layers[0].query.weight, originalQuery) <= 1e-6)
        try model.mergeAndUnload("default")
        #expect(model.adapters.isEmpty)
        #expect(bert.layers[0].query.adapters.isEmpty)
        // mergeAndUnload is a merge: the same bound (DoRA's output moved by more than 1e-5 with OpenBLAS's AVX-512 kernels).
        #expect(maxAbsDifference(try withNoGrad(forward), unmerged) <= 2e-5 * scale)
    }

    static func baseFile() throws -> SafeTensorsFile {
        try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
    }

    @Test(arguments: ["lora", "dora", "lora_seq_cls"])
    func saveThenLoadReproducesTheOutput(fixture name: String) throws {
        func build() throws -> (Module, () throws -> Tensor) {
            let bert = try Assets.loadMiniLM()
            if name == "lora_seq_cls" {
                let cls = try BertForSequenceClassification(bert: bert, numLabels: 3)
                return (cls, { try cls.forward(try fixtureBatch(Self.baseFile())) })
            }
            return (bert, { try bert.forward(try fixtureBatch(Self.baseFile())) })
        }
        let (rootA, forwardA) = try build()
        let a = AdaptedModel(root: rootA)
        try a.loadAdapter(directory: Assets.fixture("peft-minilm/\(name)"))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-rt-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try a.saveAdapter("default", directory: dir)
        let (rootB, forwardB) = try build()
        let b = AdaptedModel(root: rootB)
        try b.loadAdapter(directory: dir)
        #expect(maxAbsDifference(try withNoGrad(forwardA), try withNoGrad(forwardB)) == 0)
        // The saved config carries what PEFT needs to rebuild the adapter.
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        #expect(config?["peft_type"] as? String == "LORA")
        #expect(config?["r"] != nil && config?["lora_alpha"] != nil && config?["target_modules"] != nil)
        let keys = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors").names
        let original = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/\(name)/adapter_model.safetensors")).names
        #expect(Set(keys) == Set(original))
    }
}

@Suite struct InjectionTests {
    func config(_ json: String) throws -> AdapterConfig { try AdapterConfig(jsonText: json, source: "test config") }

    @Test func targetModulesBySuffixRegexAndAllLinear() throws {
        let bert = try Assets.loadMiniLM()
        let m = AdaptedModel(root: bert)
        let bySuffix = try m.addAdapter("a", config: config(#"{"peft_type":"LORA","r":2,"target_modules":["query","output.dense"]}"#))
        #expect(bySuffix.layers.count == 6 * 3)
        let byRegex = try m.addAdapter("b", config: config(#"{"peft_type":"LORA","r":2,"target_modules":".*layer\\.[01]\\.attention\\.self\\.(query|key)"}"#))
        #expect(byRegex.layers.map(\.path) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                                               "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"])
        let all = try m.addAdapter("c", config: config(#"{"peft_type":"LORA","r":2,"target_modules":"all-linear"}"#))
        #expect(all.layers.count == 6 * 6 + 1)  // every Linear in the encoder plus the pooler
        let excluded = try m.addAdapter("d", config: config(#"{"peft_type":"LORA","r":2,"target_modules":["query","value"],"exclude_modules":["encoder.layer.0.attention.self.value"],"layers_to_transform":[0,5],"layers_pattern":"layer"}"#))
        #expect(excluded.layers.map(\.path) == ["encoder.layer.0.attention.self.query", "encoder.layer.5.attention.self.query",
                                                "encoder.layer.5.attention.self.value"])
        #expect(m.activeAdapter == "d")
    }

    @Test func rankAndAlphaPatterns() throws {
        let m = AdaptedModel(root: try Assets.loadMiniLM())
        let a = try m.addAdapter("a", config: config(#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["query","value"],"rank_pattern":{"value":2},"alpha_pattern":{"layer\\.1\\.attention\\.self\\.query":4}}"#))
        for (path, _, layer) in a.layers {
            guard let lora = layer as? LoRALayer else { continue }
            if path.hasSuffix("value") { #expect(lora.rank == 2 && lora.scaling == 8) }
            else if path.contains("layer.1.") { #expect(lora.rank == 8 && lora.scaling == 0.5) }
            else { #expect(lora.rank == 8 && lora.scaling == 2) }
        }
    }

    @Test func aConfigThatMatchesNothingNamesPatternsAndModules() throws {
        let m = AdaptedModel(root: try Assets.loadMiniLM())
        do {
            try m.addAdapter("x", config: config(#"{"peft_type":"LORA","target_modules":["q_proj","v_proj"]}"#))
            Issue.record("a config matching nothing was accepted")
        } catch let e as GraftError {
            #expect(e.message.contains("q_proj") && e.message.contains("encoder.layer.0.attention.self.query"))
        }
        #expect(m.adapters.isEmpty)
        #expect(throws: GraftError.self) { try m.addAdapter("x", config: config(#"{"peft_type":"NOPE","target_modules":["query"]}"#)) }
        #expect(throws: GraftError.self) { try m.addAdapter("x", config: config(#"{"peft_type":"LORA","r":0,"target_modules":["query"]}"#)) }
        #expect(throws: GraftError.self) { try m.addAdapter("x", config: config(#"{"peft_type":"LORA","target_modules":["LayerNorm"]}"#)) }
    }

    @Test func namedAdaptersAddActivateDisableDelete() throws {
        let bert = try Assets.loadMiniLM()
        let m = AdaptedModel(root: bert)
        let batch = try TokenBatch(ids: [101, 7592, 2088, 102], batchSize: 1, length: 4)
        let base = try withNoGrad { try bert.forward(batch) }
        let weightBefore = bert.layers[0].query.weight.copy()
        for (i, name) in ["one", "two"].enumerated() {
            let a = try m.addAdapter(name, config: config(#"{"peft_type":"LORA","r":4,"target_modules":["query"],"init_lora_weights":false}"#), seed: UInt64(i + 1))
            #expect(a.parameterCount == 6 * 2 * 4 * 384)
        }
        let two = try withNoGrad { try bert.forward(batch) }
        try m.setActiveAdapter("one")
        let one = try withNoGrad { try bert.forward(batch) }
        #expect(maxAbsDifference(one, two) > 1e-4 && maxAbsDifference(one, base) > 1e-4)
        m.setAdaptersDisabled(true)
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, base) == 0)
        m.setAdaptersDisabled(false)
        try m.deleteAdapter("one")
        #expect(m.activeAdapter == "two")
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, two) == 0)
        try m.deleteAdapter("two")
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, base) == 0)
        #expect(maxAbsDifference(bert.layers[0].query.weight, weightBefore) == 0)
        #expect(bert.namedParameters().allSatisfy { !$0.tensor.requiresGrad })
        #expect(throws: GraftError.self) { try m.setActiveAdapter("one") }
    }
}
