import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

// Wave-2 behaviour beyond parity: seeded parts regenerated as PEFT draws them, sampled and shared parameters,
// gradient projection and initial gradients.

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
        // A file whose positions leave the layer gives NaN, not an out-of-bounds write.
        if let layer = fresh.layers.first?.adapter as? FroDLayer {
            layer.indices.pointer[0] = 1e6
            let out = withNoGrad { layer.sparseProduct(Tensor(repeating: 1, shape: [2, 384])) }
            #expect(out.scalars.allSatisfy { $0.isNaN })
        }
        #expect(FroDFactory.category("encoder.layer.0.attention.output.dense") == "attention_output")
        #expect(FroDFactory.category("model.layers.3.self_attn.q_proj") == "self_attn_q_proj")
    }
}

/// OSF: a fresh adapter is the base layer (its two SVD parts sum to W), the gradients of `U_low` and `V_low` are the
/// true ones projected off the frozen subspace (PEFT's hooks), and `S_low`'s and the input's are exact. Parity with
/// PEFT: OSFParityTests.
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
