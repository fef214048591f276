import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// LoRA options PEFT 0.21.2 writes that the shared fixtures lack (`lora_bias`, OLoRA's `init_lora_weights:
/// "olora"`, `trainable_token_indices`), against fixtures the real PEFT made
/// (scripts/fixtures/peft-minilm-lora-options.py), and `"gaussian"` initialization by its definition.
@Suite(.serialized) struct LoRAOptionTests {
    static let fixtures = ["lora_bias", "lora_bias_rslora_all", "olora", "olora_rslora_all", "lora_trainable_tokens",
                           "lora_trainable_tokens_dict", "lora_target_parameters", "lora_target_modules_and_parameters",
                           "kasa", "qalora", "qalora_all_rslora", "eva", "lora_ga", "lora_layer_replication",
                           "lora_ensure_weight_tying", "velora_random", "velora_batch_average"]
    /// The fixtures that merge (layer_replication's copies share their base weights and refuse to: LayerReplicationTests).
    static let mergeable = fixtures.filter { $0 != "lora_layer_replication" }

    func fixture(_ name: String) -> String { Assets.fixture("peft-minilm-lora-options/\(name)") }

    func batch() throws -> TokenBatch {
        try fixtureBatch(try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors")))
    }

    @Test(arguments: fixtures)
    func outputMatchesPEFT(name: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.loadAdapter(directory: fixture(name))
        let expected = try SafeTensorsFile(contentsOf: fixture(name) + "/expected.safetensors").tensor("last_hidden_state")
        let out = try withNoGrad { try bert.forward(try batch()) }
        let error = maxAbsDifference(out, expected)
        let plain = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(try batch()) } }
        let change = maxAbsDifference(plain, expected)
        print("\(name): max-abs error vs PEFT \(error) (the adapter moves the output by \(change); \(adapter.parameterCount) trainable)")
        #expect(error <= (change > 10 ? max(1e-4, 1e-5 * change) : 1e-4), "\(name): \(error)")
        #expect(change > 1e-3)
        let manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: fixture("manifest.json")))) as? [String: Any]
        let trainable = ((manifest?["methods"] as? [String: Any])?[name] as? [String: Any])?["trainable"] as? Int
        #expect(adapter.parameterCount == trainable, "trainable parameters differ from PEFT's")
    }

    @Test(arguments: mergeable)
    func mergesUnmergesAndRoundTrips(name: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.loadAdapter(directory: fixture(name))
        expectDeltaWeightReproducesLayers(adapter, method: name)
        let unmerged = try withNoGrad { try bert.forward(try batch()) }
        try model.merge("default")
        let scale = max(1, unmerged.scalars.map(abs).max() ?? 1)
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(try batch()) }, unmerged) / scale <= 2e-5)
        try model.unmerge("default")
        // W + ΔW − ΔW rounds each weight to float32 twice: the restored output is as close as the merged one, relative
        // to its scale (an absolute 1e-5 failed for QA-LoRA on one machine's BLAS).
        let restored = maxAbsDifference(try withNoGrad { try bert.forward(try batch()) }, unmerged) / scale
        print("\(name): unmerged output vs before merging, relative to the output's scale \(scale): \(restored)")
        #expect(restored <= 2e-5, "\(name): \(restored)")

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-\(name)-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try Assets.loadMiniLM()
        try AdaptedModel(root: other).loadAdapter(directory: dir)
        #expect(maxAbsDifference(try withNoGrad { try other.forward(try batch()) }, unmerged) <= 1e-5)
        // PEFT's keys (OLoRA's factors are saved as the equivalent rank-2r LoRA, under the same names).
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let original = try SafeTensorsFile(contentsOf: fixture(name) + "/adapter_model.safetensors")
        #expect(Set(saved.names) == Set(original.names))
        if name.hasPrefix("lora_bias") { #expect(saved.names.contains { $0.hasSuffix("lora_B.bias") }) }
        if name.hasPrefix("lora_trainable_tokens") {
            #expect(saved.names.contains("base_model.model.embeddings.word_embeddings.token_adapter.trainable_tokens_delta"))
        }
    }

    @Test func oloraStartsAtTheBaseWithOrthonormalB() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let base = try withNoGrad { try bert.forward(try batch()) }
        let adapter = try model.addAdapter("o", config: AdapterConfig(json: ["peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                                             "init_lora_weights": "olora", "target_modules": ["query"]], source: "olora"))
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(try batch()) }, base) <= 1e-5)
        guard let (path, lin, layer) = adapter.layers.first, let lora = layer as? LoRALayer else { Issue.record("no LoRA layer"); return }
        // BᵀB = I (Q's columns), and B·A is the rank-r part of W = QR: W − B A = Q[:, r:] R[r:, :].
        let gram = withNoGrad { matmul(lora.loraB.transposed(0, 1), lora.loraB) }
        let identity = Tensor(zeros: [8, 8])
        for i in 0..<8 { identity.pointer[i * 8 + i] = 1 }
        #expect(maxAbsDifference(gram, identity) <= 1e-5, "\(path): BᵀB is not the identity")
        let (q, r) = try qr(lin.weight)
        #expect(maxAbsDifference(withNoGrad { matmul(q, r) }, lin.weight) <= 1e-5)
        #expect(r.pointer[1 * r.shape[1]] == 0, "R is not upper triangular")
    }

    @Test func gaussianInitializationDrawsAWithStdOneOverRank() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let base = try withNoGrad { try bert.forward(try batch()) }
        let adapter = try model.addAdapter("g", config: AdapterConfig(json: ["peft_type": "LORA", "r": 4, "init_lora_weights": "gaussian",
                                                                             "target_modules": ["query", "value"]], source: "gaussian"))
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(try batch()) }, base) == 0, "B must start at zero")
        let a = adapter.layers.compactMap { ($0.adapter as? LoRALayer)?.loraA.scalars }.flatMap { $0 }
        let mean = a.reduce(0, +) / Float(a.count)
        let std = (a.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Float(a.count)).squareRoot()
        #expect(abs(std - 0.25) < 0.01 && abs(mean) < 0.01, "A's std \(std), mean \(mean); N(0, 1/r²) wants 0.25, 0")
    }

    @Test func trainableTokenIndicesAreValidatedByName() throws {
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        for (value, fragment) in [([999_999] as Any, "outside the embedding"), (["no_such_table": [1]] as Any, "names no embedding"),
                                  ([] as [Int] as Any, "non-empty"), (["x"] as Any, "is not a token id")] {
            let json: [String: Any] = ["peft_type": "LORA", "r": 2, "target_modules": ["query"], "trainable_token_indices": value]
            do {
                try model.addAdapter("t", config: AdapterConfig(json: json, source: "tokens"))
                Issue.record("accepted trainable_token_indices \(value)")
            } catch let e as GraftError {
                #expect(e.message.contains("trainable_token_indices") && e.message.contains(fragment), "\(e.message)")
            }
        }
        #expect(model.adapters.isEmpty)
        // Training reaches the rows: they get gradients with the LoRA factors.
        let adapter = try model.addAdapter("t", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["query"],
                                                                             "trainable_token_indices": [101, 2023]], source: "tokens"))
        #expect(adapter.parameterCount == 6 * 2 * 2 * 384 + 2 * 384)
    }

    @Test func targetParametersNameLinearWeightsOnly() throws {
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        for (entry, fragment) in [("no_such.weight", "matches no parameter"), ("query.bias", "not the weight of a Linear"),
                                  ("word_embeddings.weight", "not the weight of a Linear")] {
            let json: [String: Any] = ["peft_type": "LORA", "r": 2, "target_modules": [String](), "target_parameters": [entry]]
            do {
                try model.addAdapter("p", config: AdapterConfig(json: json, source: "params"))
                Issue.record("accepted target_parameters \(entry)")
            } catch let e as GraftError {
                #expect(e.message.contains("target_parameters") && e.message.contains(fragment), "\(e.message)")
            }
        }
        // Without target_modules at all, target_parameters alone selects the layers.
        let adapter = try model.addAdapter("p", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_parameters": ["value.weight"]],
                                                                      source: "params"))
        #expect(adapter.layers.map(\.path).allSatisfy { $0.hasSuffix("attention.self.value") } && adapter.layers.count == 6)
    }

    /// KaSA's regularizer is β Σ ΔΣ² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) over the layers, recomputed here in Float64.
    @Test func kasaRegularizerIsThePapersPenalty() throws {
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        let adapter = try model.addAdapter("k", config: AdapterConfig(json: ["peft_type": "LORA", "r": 4, "target_modules": ["query"],
                                                                             "init_lora_weights": false,
                                                                             "kasa_config": ["beta": 0.5, "gamma": 0.25]], source: "kasa"))
        guard let value = adapter.trainingHooks.compactMap({ $0.regularization() }).first?.item else {
            Issue.record("KaSA adds no regularization"); return
        }
        var expected = 0.0
        for case let layer as LoRALayer in adapter.layers.map(\.adapter) {
            let d = layer.kasaDiagonal?.scalars.map(Double.init) ?? []
            expected += 0.5 * d.reduce(0) { $0 + $1 * $1 }
            let a = layer.loraA.scalars.map(Double.init), b = layer.loraB.scalars.map(Double.init)
            let r = layer.rank, inF = layer.loraA.shape[1], outF = layer.loraB.shape[0]
            var gb = 0.0, ga = 0.0
            for i in 0..<r {
                for j in 0..<r {
                    let bij = (0..<outF).reduce(0.0) { $0 + b[$1 * r + i] * b[$1 * r + j] } - (i == j ? 1 : 0)
                    let aij = (0..<inF).reduce(0.0) { $0 + a[i * inF + $1] * a[j * inF + $1] } - (i == j ? 1 : 0)
                    gb += bij * bij
                    ga += aij * aij
                }
            }
            expected += 0.25 * (gb.squareRoot() + ga.squareRoot())
        }
        #expect(value.isFinite && abs(Double(value) - expected) <= 1e-4 * max(1, abs(expected)), "\(value) vs \(expected)")
        #expect(throws: GraftError.self) {
            try model.addAdapter("x", config: AdapterConfig(json: ["peft_type": "LORA", "r": 4, "target_modules": ["query"],
                                                                   "kasa_config": ["beta": -1]], source: "kasa"))
        }
    }

    /// `ensure_weight_tying` changes nothing where PEFT ties nothing (the MiniLM fixture above); on SmolLM2, whose
    /// lm_head is tied to embed_tokens, it is accepted without trained embedding rows, and with them it ties the
    /// rows into the head as PEFT does by default (TiedTrainableTokensTests).
    @Test func ensureWeightTyingIsAcceptedWithoutEmbeddingRows() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        #expect(llama.tiedHead)
        let model = AdaptedModel(root: llama)
        try model.addAdapter("t", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                                               "ensure_weight_tying": true], source: "tying"))
        #expect(throws: GraftError.self) {
            try model.addAdapter("u", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                                                   "ensure_weight_tying": "yes"], source: "tying"))
        }
    }

    /// VeLoRA's training gradients (lora_A's from the compressed input, the rest exact) against PEFT's on one
    /// step of `Σ out ⊙ w`; then a few steps on that objective lower it.
    @Test(arguments: ["velora_random", "velora_batch_average"])
    func veloraGradientsMatchPEFT(name: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.loadAdapter(directory: fixture(name))
        let file = try SafeTensorsFile(contentsOf: fixture(name) + "/expected.safetensors")
        let w = try file.tensor("objective_weights")
        model.setTraining(true)
        let objective = sum(try bert.forward(try batch()) * w)
        #expect(objective.item.isFinite)
        objective.backward()
        var worst: Float = 0, scale: Float = 0
        for (key, p) in adapter.peftStateDict {
            let short = String(key.dropFirst("base_model.model.".count))
            guard let g = p.grad, let want = try? file.tensor("grad." + short) else {
                Issue.record("\(name): no gradient for \(short)")
                continue
            }
            #expect(g.scalars.allSatisfy { $0.isFinite }, "\(short): non-finite gradient")
            worst = worse(worst, maxAbsDifference(g, want))
            scale = max(scale, worstOf(want.scalars.map(abs), empty: 0))
        }
        print("\(name): gradient max-abs error vs PEFT \(worst) (gradients up to \(scale))")
        #expect(worst <= max(1e-4, 1e-5 * scale), "\(name): gradients differ from PEFT's by \(worst)")
        let before = objective.item
        for _ in 0..<5 {
            for p in adapter.parameters { p.grad = nil }
            let l = sum(try bert.forward(try batch()) * w)
            l.backward()
            for p in adapter.parameters { if let g = p.grad { p.addInPlace(g * -1e-3) } }
        }
        let after = try withNoGrad { sum(try bert.forward(try batch()) * w) }.item
        print("\(name): objective \(before) -> \(after) in 5 steps")
        #expect(after < before)
        model.setTraining(false)
    }

    @Test func veloraConfigIsValidatedByName() throws {
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        for (value, fragment) in [(["num_groups": 0] as Any, "num_groups"), (["scale": -1] as Any, "scale"),
                                  (["init_type": "svd"] as Any, "init_type"), (["groups": 4] as Any, "velora_config.groups"),
                                  (3 as Any, "object")] {
            let json: [String: Any] = ["peft_type": "LORA", "r": 2, "target_modules": ["query"], "velora_config": value]
            do {
                try model.addAdapter("v", config: AdapterConfig(json: json, source: "velora"))
                Issue.record("accepted velora_config \(value)")
            } catch let e as GraftError {
                #expect(e.message.contains(fragment), "\(e.message)")
            }
        }
        #expect(throws: GraftError.self) {
            try model.addAdapter("v", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["query"], "use_dora": true,
                                                               "velora_config": ["num_groups": 4]], source: "velora"))
        }
        // A fresh random projection is a unit vector of ⌈384 / 5⌉ = 77 features.
        let adapter = try model.addAdapter("v", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["query"],
                                                                            "velora_config": ["num_groups": 5, "init_type": "random"]], source: "velora"))
        guard let lora = adapter.layers.first?.adapter as? LoRALayer, let e = lora.velora?.embed else { Issue.record("no VeLoRA"); return }
        #expect(e.count == 77 && abs(e.scalars.reduce(0) { $0 + $1 * $1 } - 1) < 1e-5)
    }

    @Test func loraBiasFollowsPEFTsRules() throws {
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        for extra: [String: Any] in [["init_lora_weights": "olora"], ["init_lora_weights": "gaussian"], ["use_dora": true]] {
            var json: [String: Any] = ["peft_type": "LORA", "r": 4, "lora_bias": true, "target_modules": ["query"]]
            json.merge(extra) { $1 }
            #expect(throws: GraftError.self) { try model.addAdapter("x", config: AdapterConfig(json: json, source: "lora_bias")) }
        }
        // A layer without a bias takes lora_bias in forward but cannot merge it (as PEFT).
        var rng = GraftRNG(seed: 2)
        let proj = Linear(weight: Tensor.randomNormal([6, 6], rng: &rng), bias: nil)
        let toy = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        try toy.addAdapter("b", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "lora_bias": true, "init_lora_weights": false,
                                                             "target_modules": ["proj"]], source: "bias-less"))
        let y = withNoGrad { proj.forward(Tensor.randomNormal([2, 6], rng: &rng)) }
        #expect(y.scalars.allSatisfy { $0.isFinite })
        #expect(throws: GraftError.self) { try toy.merge("b") }
    }
}
