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
    static let methods = ["glora", "delora", "hira", "tinylora", "pvera", "unilora", "gralora", "beft", "peanut", "deft", "supertuning", "waveft", "lily", "psoft", "frod"]
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

    @Test(arguments: methods)
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
            let mergedError = maxAbsDifference(try forward(), unmerged)
            #expect(mergedError / scale <= 2e-5, "\(method): merged output differs by \(mergedError)")
            try model.unmerge("default")
            // W + ΔW − ΔW rounds W to ΔW's scale (DeLoRA's ΔW is ~20× W): relative to the output, as above.
            let unmergedError = maxAbsDifference(try forward(), unmerged)
            #expect(unmergedError / scale <= 2e-5, "\(method): unmerged output differs by \(unmergedError)")
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
        var rng = GraftRNG(seed: 9)
        for (path, lin, layer) in adapter.layers.prefix(3) {
            let x = Tensor.randomNormal([4, lin.inFeatures], rng: &rng)
            let adapted = withNoGrad { lin.forward(x) }
            guard let dw = layer.deltaWeight(base: lin) else { Issue.record("\(method) has no ΔW"); continue }
            let bias = lin.bias.map { b in withNoGrad { b + (layer.deltaBias(base: lin) ?? Tensor(zeros: b.shape)) } }
            let merged = withNoGrad { linear(x, lin.weight + dw, bias) }
            let scale = max(1, adapted.scalars.map(abs).max() ?? 1)
            #expect(maxAbsDifference(adapted, merged) / scale < 1e-5, "\(method) \(path): \(maxAbsDifference(adapted, merged))")
        }
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

/// Parts PEFT draws from a seed are regenerated as PEFT draws them: checked against what PEFT saved.
@Suite(.serialized) struct Wave2RegenerationTests {
    /// PVeRA's projections from `projection_prng_key` (PyTorch's `kaiming_uniform_` on its generator) equal the
    /// fixture's saved `pvera_A` / `pvera_B`, and a file without them loads to the same output.
    @Test func pveraProjectionsMatchPEFTsGenerator() throws {
        let dir = Assets.fixture("peft-minilm-wave2/pvera")
        let file = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let text = try String(contentsOfFile: dir + "/adapter_config.json", encoding: .utf8)
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let fresh = try model.addAdapter("fresh", config: AdapterConfig(jsonText: text, source: "pvera"))
        for key in ["base_model.pvera_A", "base_model.pvera_B"] {
            guard let regenerated = fresh.shared.first(where: { $0.key == key })?.tensor else { Issue.record("no \(key)"); continue }
            let saved = try file.tensor(key)
            #expect(regenerated.shape == saved.shape)
            #expect(maxAbsDifference(regenerated, saved) == 0, "\(key) differs by \(maxAbsDifference(regenerated, saved))")
        }
    }

    /// TinyLoRA's projections `P` from `projection_seed + layer index` (PyTorch's `normal` on its generator) equal
    /// the fixture's saved `tinylora_P` to float32 rounding of log/sin/cos, in PEFT's layer order.
    @Test func tinyLoRAProjectionsMatchPEFTsGenerator() throws {
        let dir = Assets.fixture("peft-minilm-wave2/tinylora")
        let file = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let text = try String(contentsOfFile: dir + "/adapter_config.json", encoding: .utf8)
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        let fresh = try model.addAdapter("fresh", config: AdapterConfig(jsonText: text, source: "tinylora"))
        var worst: Float = 0
        for (path, _, layer) in fresh.layers {
            guard let tiny = layer as? TinyLoRALayer else { Issue.record("not TinyLoRA"); continue }
            let saved = try file.tensor("base_model.model.\(path).tinylora_P")
            #expect(saved.shape == tiny.projections.shape)
            worst = max(worst, maxAbsDifference(saved, tiny.projections))
        }
        #expect(worst < 1e-5, "TinyLoRA projections differ from PEFT's by \(worst)")
    }

    /// The groups PEFT forms with `weight_tying` (Python's half-to-even rounding).
    @Test func tinyLoRAGroupsFollowPEFT() {
        #expect(TinyLoRAFactory.groups(layers: 18, tying: 0) == (18, 1))
        #expect(TinyLoRAFactory.groups(layers: 18, tying: 1) == (1, 18))
        #expect(TinyLoRAFactory.groups(layers: 10, tying: 0.75) == (2, 5))
        #expect(TinyLoRAFactory.groups(layers: 7, tying: 0.5) == (4, 1))
    }
}

/// UniLoRA's index assignment is NumPy's `default_rng(proj_seed)` draw, checked against values NumPy 2.4 printed
/// for `generate_index` (Floyd's `choice` path, then `shuffle`).
@Suite struct UniLoRAIndexTests {
    @Test func indicesMatchNumPy() {
        let idx = UniLoRAFactory.generateIndex(count: 1000, length: 256, seed: 42)
        #expect(Array(idx.prefix(12)) == [125, 66, 161, 165, 231, 217, 121, 178, 46, 252, 142, 48])
        #expect(Array(idx.suffix(4)) == [75, 127, 84, 232])
        var counts = [Int](repeating: 0, count: 256)
        for i in idx { counts[Int(i)] += 1 }
        #expect(counts.allSatisfy { $0 == 3 || $0 == 4 })
    }

    @Test func seedSequenceAndChoiceMatchNumPy() {
        var rng = NumpyPCG64(seed: 7)
        #expect(rng.choiceWithoutReplacement(16, 5) == [8, 9, 11, 15, 13])
        var big = NumpyPCG64(seed: 3)
        // The tail-shuffle path (population over 10000).
        #expect(Array(big.choiceWithoutReplacement(12000, 3000).prefix(5)) == [4503, 10345, 292, 8887, 3074])
    }
}

/// PVeRA's sampled path: with `generator_seed` the noise is PyTorch's draw, so a fixed generator makes the
/// sampled forward deterministic and its gradients (through μ and log σ²) checkable.
@Suite struct PVeRASamplingTests {
    @Test func sampledForwardGradientsMatchFiniteDifferences() throws {
        var rng = GraftRNG(seed: 11)
        let proj = Linear(weight: Tensor.randomNormal([8, 8], std: 0.5, rng: &rng), bias: Tensor.randomNormal([8], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let json = #"{"peft_type":"PVERA","r":3,"sample_at_inference":true,"generator_seed":5,"target_modules":["proj"]}"#
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: "pvera"))
        guard let layer = adapter.layers.first?.adapter as? PVeRALayer else { Issue.record("not PVeRA"); return }
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        let x = Tensor.randomNormal([3, 8], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([3, 8], rng: &rng)
        func objective() -> Double {
            layer.noise = TorchGenerator(seed: 5)
            let out = withNoGrad { proj.forward(x.detached()) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        layer.noise = TorchGenerator(seed: 5)
        let out = proj.forward(x)
        layer.noise = TorchGenerator(seed: 5)
        let eval = withNoGrad { proj.forward(x.detached()) }
        #expect(maxAbsDifference(out, eval) == 0, "the same generator draws the same noise")
        sum(out * w).backward()
        let check = finiteDifferenceCheck(adapter.peftStateDict + [("input", x)], step: 1e-2, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty && check.worst < 2e-3, "PVeRA sampled: worst \(check.worst), missing \(check.missing)")
        // The log-variance half of λd is trained only when sampling.
        guard let grad = layer.lambdaD.grad else { return }
        #expect(grad.scalars.suffix(3).contains { $0 != 0 })
    }
}

/// Lily shares A within `stride_A` consecutive layers of a target and B across all of them, as PEFT does: the
/// optimizer sees each shared tensor once, and the count matches PEFT's.
@Suite struct LilySharingTests {
    @Test func stridesShareAAndTargetsShareB() throws {
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        let json = #"{"peft_type":"LILY","r":4,"stride_A":2,"num_B":2,"target_modules":["query","value"]}"#
        let adapter = try model.addAdapter("l", config: AdapterConfig(jsonText: json, source: "lily"))
        let layers = adapter.layers.compactMap { $0.adapter as? LilyLayer }
        let queries = zip(adapter.layers, layers).filter { $0.0.path.hasSuffix("query") }.map(\.1)
        #expect(queries.count == 6)
        #expect(queries[0].a === queries[1].a && queries[1].a !== queries[2].a)
        #expect(queries.allSatisfy { $0.b === queries[0].b })
        #expect(layers.first { $0.b !== queries[0].b } != nil, "value layers have their own B")
        // Per target: B 2·4×384, three A 4×384, six routers 2×4.
        #expect(adapter.parameterCount == 2 * (8 * 384 + 3 * 4 * 384 + 6 * 8))
        #expect(throws: GraftError.self) { try model.merge("l") }
    }
}

/// FRoD's sparse positions are PyTorch's `randperm` on one generator across roles in sorted order, as PEFT saved
/// them; its role names follow PEFT's.
@Suite struct FroDPositionTests {
    @Test func positionsMatchPEFTsGenerator() throws {
        let dir = Assets.fixture("peft-minilm-wave2/frod")
        let file = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let text = try String(contentsOfFile: dir + "/adapter_config.json", encoding: .utf8)
        let fresh = try AdaptedModel(root: try Assets.loadMiniLM()).addAdapter("f", config: AdapterConfig(jsonText: text, source: "frod"))
        for role in ["self_key", "self_query", "self_value"] {
            let key = "base_model.frod_s_indices.\(role)"
            guard let generated = fresh.shared.first(where: { $0.key == key })?.tensor else { Issue.record("no \(key)"); continue }
            #expect(generated.scalars.map { Int64($0) } == (try file.int64s(key)), "\(role) positions differ from PEFT's")
        }
        #expect(FroDFactory.category("encoder.layer.0.attention.output.dense") == "attention_output")
        #expect(FroDFactory.category("model.layers.3.self_attn.q_proj") == "self_attn_q_proj")
    }
}

/// OSF: a fresh adapter is the base layer (its two SVD parts sum to W), the gradients of `U_low` and `V_low` are the
/// true ones projected off the frozen subspace (PEFT's hooks), and `S_low`'s and the input's are exact. PEFT's
/// MiniLM fixture (20 MB) is not vendored; its parity was measured once against the shared fixtures.
@Suite struct OSFTests {
    @Test func freshAdapterIsTheBaseAndGradientsAreProjected() throws {
        var rng = GraftRNG(seed: 11)
        let proj = Linear(weight: Tensor.randomNormal([8, 6], std: 0.5, rng: &rng), bias: Tensor.randomNormal([8], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let x = Tensor.randomNormal([3, 6], rng: &rng).requiringGrad()
        let base = withNoGrad { proj.forward(x.detached()) }
        let adapter = try model.addAdapter("o", config: AdapterConfig(jsonText: #"{"peft_type":"OSF","effective_rank":2,"target_modules":["proj"]}"#, source: "osf"))
        guard let layer = adapter.layers.first?.adapter as? OSFLayer else { Issue.record("not OSF"); return }
        #expect(layer.uLow.shape == [8, 4] && layer.vLow.shape == [4, 6] && adapter.parameterCount == 8 * 4 + 4 + 4 * 6)
        #expect(maxAbsDifference(withNoGrad { proj.forward(x.detached()) }, base) < 1e-5)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        let w = Tensor.randomNormal([3, 8], rng: &rng)
        func objective() -> Double {
            zip(withNoGrad { proj.forward(x.detached()) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let loss = sum(proj.forward(x) * w)
        #expect(loss.item.isFinite)
        loss.backward()
        let exact = finiteDifferenceCheck([("S_low", layer.sLow), ("input", x)], step: 1e-2, relativeStep: true, value: objective)
        #expect(exact.missing.isEmpty && exact.worst < 2e-3, "S_low / input: \(exact.worst)")
        // Central differences of U_low and V_low, projected as PEFT's hooks project the gradient.
        func numeric(_ t: Tensor) -> Tensor {
            let g = Tensor(zeros: t.shape)
            for i in 0..<t.count {
                let saved = t.pointer[i]
                t.pointer[i] = saved + 1e-2
                let up = objective()
                t.pointer[i] = saved - 1e-2
                let down = objective()
                t.pointer[i] = saved
                g.pointer[i] = Float((up - down) / 2e-2)
            }
            return g
        }
        let gu = numeric(layer.uLow), gv = numeric(layer.vLow)
        let expectedU = gu - matmul(layer.uHigh, matmul(layer.uHigh, gu, transposeA: true))
        let expectedV = gv - matmul(matmul(gv, layer.vHigh, transposeB: true), layer.vHigh)
        guard let au = layer.uLow.grad, let av = layer.vLow.grad else { Issue.record("no U_low / V_low gradient"); return }
        #expect(maxAbsDifference(au, expectedU) < 2e-3 && maxAbsDifference(av, expectedV) < 2e-3)
        #expect(maxAbsDifference(au, gu) > 1e-3, "the projection changes the gradient")
        // Merge folds W' in; unmerge restores W.
        let adapted = withNoGrad { proj.forward(x.detached()) }
        try model.merge("o")
        #expect(maxAbsDifference(withNoGrad { proj.forward(x.detached()) }, adapted) < 1e-4)
        try model.unmerge("o")
        #expect(maxAbsDifference(withNoGrad { proj.forward(x.detached()) }, adapted) < 1e-4)
    }
}

/// DeLoRA starts with B = 0, where its column norms sit below the clamp: the gradients must be finite (PyTorch's
/// clamp passes none there), so the first optimizer step is finite.
@Suite struct DeLoRAInitialGradientTests {
    @Test func zeroBHasFiniteGradients() throws {
        var rng = GraftRNG(seed: 2)
        let proj = Linear(weight: Tensor.randomNormal([8, 8], rng: &rng), bias: nil)
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let adapter = try model.addAdapter("d", config: AdapterConfig(jsonText: #"{"peft_type":"DELORA","r":3,"target_modules":["proj"]}"#, source: "delora"))
        let x = Tensor.randomNormal([4, 8], rng: &rng)
        sum(proj.forward(x) * Tensor.randomNormal([4, 8], rng: &rng)).backward()
        for (key, p) in adapter.peftStateDict {
            guard let g = p.grad else { Issue.record("\(key): no gradient"); continue }
            let finite = g.scalars.allSatisfy { $0.isFinite }
            #expect(finite, "\(key): non-finite gradient")
        }
    }
}
