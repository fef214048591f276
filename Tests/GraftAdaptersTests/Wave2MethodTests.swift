import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// The second wave of PEFT 0.21.2 tuners (issue 14): PEFT's files reproduce PEFT's MiniLM outputs, merge where
/// PEFT can, and save back under the same keys and shapes.
@Suite(.serialized) struct Wave2ParityTests {
    static let methods = ["glora", "delora", "hira", "tinylora", "pvera", "unilora", "gralora", "beft", "peanut", "deft", "supertuning", "waveft", "lily", "psoft", "frod", "adamss"]
    /// Methods PEFT cannot merge.
    static let unmergeable: Set<String> = ["lily"]

    func base() throws -> SafeTensorsFile {
        try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm-wave2/base_expected.safetensors"))
    }

    func manifestEntry(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Assets.fixture("peft-minilm-wave2/manifest.json")))
        let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        return ((manifest?["methods"] as? [String: Any])?[name] as? [String: Any]) ?? [:]
    }

    /// The fixture's tolerance: 1e-4, or 1e-5 of the output's scale where the adapter moves it by more than 10.
    func tolerance(_ method: String, expected: Tensor) throws -> Float {
        let change = (try manifestEntry(method)["max_abs_change_vs_base"] as? Double) ?? 0
        let scale = expected.scalars.map(abs).max() ?? 0
        return change > 10 ? max(1e-4, 1e-5 * scale) : 1e-4
    }

    /// DeLoRA's fixture is compared within its measured conditioning instead (IllConditionedFixtureTests).
    @Test(arguments: methods.filter { $0 != "delora" })
    func outputMatchesPEFT(method: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.loadAdapter(directory: Assets.fixture("peft-minilm-wave2/\(method)"))
        let expected = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm-wave2/\(method)/expected.safetensors")).tensor("last_hidden_state")
        let out = try withNoGrad { try bert.forward(try fixtureBatch(try base())) }
        let err = maxAbsDifference(out, expected)
        print("\(method): max-abs error vs PEFT \(err) (\(adapter.layers.count) layers, \(adapter.parameterCount) trainable)")
        #expect(err <= (try tolerance(method, expected: expected)), "\(method): max-abs error \(err)")
        #expect(adapter.parameterCount == (try manifestEntry(method)["trainable"] as? Int), "trainable parameter count differs from PEFT's")
        let plain = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(try fixtureBatch(try base())) } }
        #expect(maxAbsDifference(plain, expected) > 1e-3)
    }

    @Test(arguments: methods)
    func mergeUnmergeAndRoundTrip(method: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        try model.loadAdapter(directory: Assets.fixture("peft-minilm-wave2/\(method)"))
        let forward = { try withNoGrad { try bert.forward(try fixtureBatch(try self.base())) } }
        let unmerged = try forward()
        if Self.unmergeable.contains(method) {
            #expect(throws: GraftError.self) { try model.merge("default") }
        } else {
            try model.merge("default")
            let scale = max(1, unmerged.scalars.map(abs).max() ?? 1)
            // W + ΔW rounds to ΔW's scale, and DeLoRA's ΔW is ~20× W: float32's 6e-8 × √384 terms × 20 is 2.3e-5 of
            // the output (measured 2.05e-5 with OpenBLAS's AVX-512 kernels), so the bound is twice that.
            let mergedError = maxAbsDifference(try forward(), unmerged)
            #expect(mergedError / scale <= 5e-5, "\(method): merged output differs by \(mergedError)")
            try model.unmerge("default")
            // W + ΔW − ΔW likewise rounds W to ΔW's scale: relative to the output, as above.
            let unmergedError = maxAbsDifference(try forward(), unmerged)
            #expect(unmergedError / scale <= 5e-5, "\(method): unmerged output differs by \(unmergedError)")
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-\(method)-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try Assets.loadMiniLM()
        let reloaded = AdaptedModel(root: other)
        try reloaded.loadAdapter(directory: dir)
        #expect(maxAbsDifference(try withNoGrad { try other.forward(try fixtureBatch(try base())) }, unmerged) == 0)
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let original = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm-wave2/\(method)/adapter_model.safetensors"))
        #expect(Set(saved.names) == Set(original.names), "\(method): saved keys differ from PEFT's")
        for name in original.names where saved.contains(name) {
            #expect(saved.info(name)?.shape == original.info(name)?.shape, "\(method): \(name) shape")
        }
    }

    /// ΔW (and the bias change) reproduces each adapted layer on its own.
    @Test(arguments: methods.filter { !unmergeable.contains($0) })
    func deltaWeightReproducesTheLayer(method: String) throws {
        let bert = try Assets.loadMiniLM()
        let adapter = try AdaptedModel(root: bert).loadAdapter(directory: Assets.fixture("peft-minilm-wave2/\(method)"))
        expectDeltaWeightReproducesLayers(adapter, method: method)
    }
}

/// Analytic gradients of every wave-2 method against central differences of its own forward, on a toy Linear
/// with a bias (GLoRA's bias paths) and on inputs.
@Suite struct Wave2GradientTests {
    static let configs: [(String, String)] = [
        ("GLoRA", #"{"peft_type":"GLORA","r":2,"target_modules":["proj"],"init_weights":false}"#),
        ("GLoRA vector", #"{"peft_type":"GLORA","r":2,"config_A_B":"vector","config_C":"vector","config_D_E":"vector","target_modules":["proj"]}"#),
        ("GLoRA constant", #"{"peft_type":"GLORA","r":2,"config_A_B":"constant","config_C":"none","config_D_E":"none","target_modules":["proj"]}"#),
        ("DeLoRA", #"{"peft_type":"DELORA","r":3,"delora_lambda":4,"target_modules":["proj"],"init_weights":false}"#),
        ("HiRA", #"{"peft_type":"HIRA","r":2,"target_modules":["proj"],"init_weights":false}"#),
        ("TinyLoRA", #"{"peft_type":"TINYLORA","r":3,"u":5,"target_modules":["proj"],"init_weights":"uniform"}"#),
        ("PVeRA", #"{"peft_type":"PVERA","r":3,"target_modules":["proj"]}"#),
        ("GLoRA vector A", #"{"peft_type":"GLORA","r":2,"config_A_B":"vector","config_C":"none","config_D_E":"none","target_modules":["proj"]}"#),
        ("GLoRA vector C", #"{"peft_type":"GLORA","r":2,"config_A_B":"none","config_C":"vector","config_D_E":"none","target_modules":["proj"]}"#),
        ("GLoRA vector DE", #"{"peft_type":"GLORA","r":2,"config_A_B":"none","config_C":"none","config_D_E":"vector","target_modules":["proj"]}"#),
        ("BEFT", #"{"peft_type":"BEFT","target_modules":["proj"]}"#),
        ("PEANuT", #"{"peft_type":"PEANUT","r":3,"depth":2,"act_fn":"gelu","scaling":0.5,"target_modules":["proj"],"init_weights":false}"#),
        ("DEFT", #"{"peft_type":"DEFT","r":3,"alpha":6,"target_modules":["proj"]}"#),
        ("DEFT PaRa", #"{"peft_type":"DEFT","r":3,"para":true,"target_modules":["proj"]}"#),
        ("Super-Tuning", #"{"peft_type":"SUPERTUNING","sparsity":0.8,"r":2,"lora_alpha":4,"target_modules":["proj"]}"#),
        ("WaveFT", #"{"peft_type":"WAVEFT","n_frequency":10,"scaling":3,"random_loc_seed":4,"target_modules":["proj"]}"#),
        ("Lily", #"{"peft_type":"LILY","r":2,"num_B":3,"scaling":2,"init_weights":false,"target_modules":["proj"]}"#),
        ("PSOFT", #"{"peft_type":"PSOFT","r":4,"psoft_alpha":8,"init_weights":false,"target_modules":["proj"]}"#),
        ("PSOFT Neumann", #"{"peft_type":"PSOFT","r":4,"psoft_alpha":8,"use_cayley_neumann":true,"num_cayley_neumann_terms":4,"cayley_neumann_eps":0.5,"init_weights":false,"target_modules":["proj"]}"#),
        ("PSOFT free", #"{"peft_type":"PSOFT","r":3,"psoft_orth":false,"psoft_mag_a":false,"ab_svd_init":"pissa_init","init_weights":false,"target_modules":["proj"]}"#),
        ("FRoD", #"{"peft_type":"FROD","sparse_rate":0.1,"init_weights":false,"target_modules":["proj"]}"#),
        ("WaveFT sparse", #"{"peft_type":"WAVEFT","n_frequency":10,"scaling":3,"use_idwt":false,"target_modules":["proj"]}"#),
        ("UniLoRA", #"{"peft_type":"UNILORA","r":2,"theta_d_length":7,"proj_seed":3,"target_modules":["proj"]}"#),
        ("GraLoRA", #"{"peft_type":"GRALORA","r":4,"alpha":8,"gralora_k":2,"init_weights":false,"target_modules":["proj"]}"#),
        ("AdaMSS", #"{"peft_type":"ADAMSS","r":4,"num_subspaces":3,"subspace_rank":2,"init_weights":null,"target_modules":["proj"]}"#),
        ("AdaMSS dynamic rank", #"{"peft_type":"ADAMSS","r":5,"num_subspaces":2,"subspace_rank":3,"use_dynamic_rank":true,"svd_threshold":0.05,"init_weights":null,"target_modules":["proj"]}"#),
        ("GraLoRA hybrid", #"{"peft_type":"GRALORA","r":2,"hybrid_r":2,"alpha":8,"gralora_k":2,"init_weights":false,"target_modules":["proj"]}"#),
    ]

    @Test(arguments: configs.map(\.0))
    func gradientsMatchFiniteDifferences(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        var rng = GraftRNG(seed: 11)
        let (inF, outF, rows) = (8, 8, 3)
        let proj = Linear(weight: Tensor.randomNormal([outF, inF], std: 0.5, rng: &rng), bias: Tensor.randomNormal([outF], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        let trainableShared = adapter.shared.filter { $0.tensor.requiresGrad }
        for (_, p) in adapter.peftStateDict + trainableShared {
            for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() }
        }
        let x = Tensor.randomNormal([rows, inF], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([rows, outF], rng: &rng)
        func objective() -> Double {
            let out = withNoGrad { proj.forward(x.detached()) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let loss = sum(proj.forward(x) * w)
        #expect(loss.item.isFinite, "\(method): loss \(loss.item)")
        loss.backward()
        let checked = adapter.peftStateDict + trainableShared + [("input", x)]
        // DEFT and PEANuT pass P / W·A through ReLU: entries within a step of its kink are left out.
        let kinks = method.hasPrefix("DEFT") || method.hasPrefix("PEANuT")
        let check = finiteDifferenceCheck(checked, step: kinks ? 1e-3 : 1e-2, relativeStep: true, skipKinks: kinks, report: 2e-3, value: objective)
        #expect(check.missing.isEmpty, "\(method): no gradient for \(check.missing)")
        // NaN-aware: `worst` is NaN when any gradient is, and NaN fails this comparison.
        #expect(check.worst < 2e-3, "\(method): worst gradient error \(check.worst)")
    }
}

/// Every wave-2 config key is honoured or rejected by name.
@Suite struct Wave2ConfigKeyTests {
    func rejection(_ json: String) -> String? {
        var rng = GraftRNG(seed: 1)
        let proj = Linear(weight: Tensor.randomNormal([64, 64], rng: &rng), bias: Tensor.randomNormal([64], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        do {
            _ = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: "adapter_config.json"))
            return nil
        } catch let e as GraftError {
            return e.message
        } catch {
            return "\(error)"
        }
    }

    @Test(arguments: [
        (#""peft_type": "GLORA", "config_A_B": "dense""#, "config_A_B"),
        (#""peft_type": "GLORA", "bias": "all""#, "bias"),
        (#""peft_type": "GLORA", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "DELORA", "bias": "delora_only""#, "bias"),
        (#""peft_type": "DELORA", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "HIRA", "fan_in_fan_out": true"#, "fan_in_fan_out"),
        (#""peft_type": "HIRA", "init_weights": "orthogonal""#, "init_weights"),
        (#""peft_type": "HIRA", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "TINYLORA", "weight_tying": 2"#, "weight_tying"),
        (#""peft_type": "TINYLORA", "bias": "all""#, "bias"),
        (#""peft_type": "TINYLORA", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "PVERA", "fan_in_fan_out": true"#, "fan_in_fan_out"),
        (#""peft_type": "PVERA", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "UNILORA", "theta_d_length": 0"#, "theta_d_length"),
        (#""peft_type": "UNILORA", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "GRALORA", "r": 6, "gralora_k": 4"#, "gralora_k"),
        (#""peft_type": "GRALORA", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "BEFT", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "PEANUT", "act_fn": "mish""#, "act_fn"),
        (#""peft_type": "PEANUT", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "DEFT", "decomposition_method": "qr""#, "decomposition_method"),
        (#""peft_type": "DEFT", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "SUPERTUNING", "sparsity": 1.5"#, "sparsity"),
        (#""peft_type": "SUPERTUNING", "r": 4"#, "lora_alpha"),
        (#""peft_type": "SUPERTUNING", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "WAVEFT", "wavelet_family": "sym4""#, "wavelet_family"),
        (#""peft_type": "WAVEFT", "proportional_parameters": true"#, "proportional_parameters"),
        (#""peft_type": "WAVEFT", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "LILY", "num_B": 0"#, "num_B"),
        (#""peft_type": "LILY", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "PSOFT", "psoft_svd": "lowrank""#, "psoft_svd"),
        (#""peft_type": "PSOFT", "ab_svd_init": "olora""#, "ab_svd_init"),
        (#""peft_type": "PSOFT", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "FROD", "sparse_rate": 2"#, "sparse_rate"),
        (#""peft_type": "FROD", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "OSF", "effective_rank": -2"#, "effective_rank"),
        (#""peft_type": "OSF", "made_up_option": 3"#, "made_up_option"),
        (#""peft_type": "ADAMSS", "use_asa": true"#, "use_asa"),
        (#""peft_type": "ADAMSS", "init_weights": "gaussian""#, "init_weights"),
        (#""peft_type": "ADAMSS", "num_subspaces": 0"#, "num_subspaces"),
        (#""peft_type": "ADAMSS", "made_up_option": 3"#, "made_up_option"),
    ])
    func unsupportedSettingsAreRejectedByName(keys: String, key: String) {
        let message = rejection("{\(keys), \"target_modules\": [\"proj\"]}")
        #expect(message?.contains("'\(key)'") == true, "\(key): \(message ?? "accepted")")
    }

    /// Each fixture's own config loads with every key it carries honoured.
    @Test(arguments: Wave2ParityTests.methods)
    func fixtureConfigsLoad(method: String) throws {
        let text = try String(contentsOfFile: Assets.fixture("peft-minilm-wave2/\(method)/adapter_config.json"), encoding: .utf8)
        let config = try AdapterConfig(jsonText: text, source: method)
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        _ = try model.addAdapter("a", config: config)
    }

    @Test func patternsPickPerLayerRanksAndLambdas() throws {
        var rng = GraftRNG(seed: 2)
        let a = Linear(weight: Tensor.randomNormal([6, 6], rng: &rng), bias: nil)
        let b = Linear(weight: Tensor.randomNormal([6, 6], rng: &rng), bias: nil)
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("a", a), ("b", b)]))
        let json = #"{"peft_type":"DELORA","r":2,"delora_lambda":3,"rank_pattern":{"b":4},"lambda_pattern":{"b":7},"target_modules":["a","b"]}"#
        let adapter = try model.addAdapter("d", config: AdapterConfig(jsonText: json, source: "delora"))
        let layers = adapter.layers.compactMap { $0.adapter as? DeLoRALayer }
        #expect(layers.map(\.rank) == [2, 4])
        #expect(layers.map { $0.lambda.scalars[0] } == [3, 7])
    }
}
