import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// LoRA's `layer_replication` against PEFT on SmolLM2 (scripts/fixtures/peft-smollm2-lora-options.py; the MiniLM
/// case runs in LoRAOptionTests), plus what the rebuilt stack must and must not do.
@Suite(.serialized) struct LayerReplicationTests {
    static let root = "peft-smollm2-lora-options/lora_layer_replication"

    func logits(_ llama: LlamaModel, _ batch: TokenBatch) throws -> Tensor { try firstLogitColumns(llama, batch) }

    @Test func smolLM2LogitsMatchPEFTAndSaveBack() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        let file = try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/expected.safetensors"))
        let batch = try fixtureBatch(file)
        let base = try logits(llama, batch)
        let adapter = try model.loadAdapter(directory: Assets.fixture(Self.root))
        #expect(llama.layers.count == 32 && llama.layerReplication == [[0, 16], [14, 30]])
        #expect(maxAbsDifference(llama.layers[16].qProj.weight, llama.layers[14].qProj.weight) == 0 && llama.layers[16].qProj !== llama.layers[14].qProj)
        let want = try file.tensor("logits_first512")
        let out = try logits(llama, batch)
        let error = maxAbsDifference(out, want), change = maxAbsDifference(base, want)
        let scale = worstOf(want.scalars.map(abs), empty: 0)
        let tolerance = change > 10 ? max(1e-4, 1e-5 * scale) : 1e-4
        print("layer_replication (SmolLM2): max-abs error vs PEFT \(error) (logits up to \(scale), moved by \(change); tolerance \(tolerance)); \(adapter.parameterCount) trainable on \(adapter.layers.count) layers")
        #expect(error <= tolerance)
        #expect(adapter.layers.count == 32 && adapter.parameterCount == 36864)
        // Generation runs through the deeper stack (a cache per stacked layer).
        let tokens = try llama.generate(prompt: Array(batch.row(0).prefix(5)), parameters: GenerationParameters(maxNewTokens: 2))
        #expect(tokens.count == 2)

        do {
            try model.merge("default")
            Issue.record("merged a replicated adapter")
        } catch let e as GraftError {
            #expect(e.message.contains("layer_replication"), "\(e.message)")
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-replication-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let original = try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/adapter_model.safetensors"))
        #expect(Set(saved.names) == Set(original.names))
        for name in original.names { #expect(saved.info(name)?.shape == original.info(name)?.shape, "\(name)") }
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        #expect((config?["layer_replication"] as? [[Int]]) == [[0, 16], [14, 30]])
        // Deleting the last adapter restores the stack as loaded; reloading rebuilds it.
        try model.deleteAdapter("default")
        #expect(llama.layers.count == 30 && llama.layerReplication == nil)
        #expect(maxAbsDifference(try logits(llama, batch), base) == 0)
        try model.loadAdapter(directory: dir)
        #expect(maxAbsDifference(try logits(llama, batch), out) == 0)
    }

    @Test func refusesWhatWouldBreakOtherAdaptersByName() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        for (value, fragment) in [([[0, 7]] as Any, "0 ≤ start < end ≤ 6"), ([[3, 3]] as Any, "0 ≤ start < end"),
                                  ([[1]] as Any, "pair"), ("0-4" as Any, "list")] {
            let json: [String: Any] = ["peft_type": "LORA", "r": 2, "target_modules": ["query"], "layer_replication": value]
            do {
                try model.addAdapter("r", config: AdapterConfig(json: json, source: "replication"))
                Issue.record("accepted layer_replication \(value)")
            } catch let e as GraftError {
                #expect(e.message.contains("layer_replication") && e.message.contains(fragment), "\(e.message)")
            }
        }
        #expect(bert.layers.count == 6 && bert.layerReplication == nil)
        try model.addAdapter("plain", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["query"]], source: "plain"))
        do {
            try model.addAdapter("r", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["query"],
                                                               "layer_replication": [[0, 6], [5, 6]]], source: "replication"))
            Issue.record("rebuilt the stack under an attached adapter")
        } catch let e as GraftError {
            #expect(e.message.contains("adapters are attached"), "\(e.message)")
        }
        #expect(bert.layers.count == 6)
        // A failing adapter leaves the stack as it was.
        let fresh = AdaptedModel(root: try Assets.loadMiniLM())
        #expect(throws: GraftError.self) {
            try fresh.addAdapter("r", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["no_such"],
                                                               "layer_replication": [[0, 6], [5, 6]]], source: "replication"))
        }
        #expect((fresh.root as? BertModel)?.layers.count == 6)
    }

    @Test func copiesTrainTheirOwnFactorsWithExactGradients() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("r", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": false,
                                                                            "target_modules": ["value"], "layer_replication": [[0, 2], [1, 3]]],
                                                                      source: "replication"), seed: 3)
        #expect(bert.layers.count == 4 && adapter.layers.map(\.path) == (0..<4).map { "encoder.layer.\($0).attention.self.value" })
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 102], [101, 2023, 102]])
        var rng = GraftRNG(seed: 4)
        let target = Tensor.randomNormal([2, 4, 384], std: 0.1, rng: &rng)
        func loss() throws -> Tensor {
            let d = try bert.forward(batch) - target
            return sum(d * d) * (1 / Float(d.count))
        }
        let value = try loss()
        #expect(value.item.isFinite)
        value.backward()
        // The two copies of layer 1 (stack positions 1 and 2) hold different factors and get different gradients.
        let copies = [adapter.layers[1].adapter, adapter.layers[2].adapter].compactMap { $0 as? LoRALayer }
        #expect(copies.count == 2 && copies[0].loraB.grad.map { maxAbsDifference($0, copies[1].loraB.grad ?? $0) > 0 } == true)
        let check = try finiteDifferenceCheck(adapter.peftStateDict, step: 1e-2, relativeStep: true, samples: 6) {
            Double(try withNoGrad { try loss() }.item)
        }
        print("layer_replication: gradient check worst relative error \(check.worst)")
        #expect(check.missing.isEmpty && check.worst <= 2e-2, "worst \(check.worst)")
        // A few plain gradient steps lower the loss.
        let before = value.item
        for _ in 0..<5 {
            for p in adapter.parameters { p.grad = nil }
            let l = try loss()
            l.backward()
            for p in adapter.parameters { if let g = p.grad { p.addInPlace(g * -0.5) } }
        }
        let after = try withNoGrad { try loss() }.item
        print("layer_replication: loss \(before) -> \(after) in 5 steps")
        #expect(after < before)
    }
}
