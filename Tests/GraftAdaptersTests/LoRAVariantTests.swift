import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// LoRA-XS, asymmetric LoRA, the SVD-based LoRA initializations (PiSSA, MiLoRA, CorDA), SVFT and RoSA:
/// the SVD they rest on, their initial outputs, merge / unmerge, save → load, and RoSA's warm-up mask.
@Suite struct LoRAVariantTests {
    static let configs: [(String, String)] = [
        ("LoRA-XS", #"{"peft_type":"LORAXS","r":4,"lora_alpha":8,"target_modules":["query","value"]}"#),
        ("asymmetric LoRA", #"{"peft_type":"ASYMMETRIC_LORA","r":4,"lora_alpha":8,"target_modules":["query","value"]}"#),
        ("asymmetric LoRA flag", #"{"peft_type":"LORA","train_a":false,"r":4,"lora_alpha":8,"target_modules":["query","value"]}"#),
        ("PiSSA", #"{"peft_type":"LORA","init_lora_weights":"pissa","r":4,"lora_alpha":8,"target_modules":["query","value"]}"#),
        ("PiSSA rsLoRA", #"{"peft_type":"LORA","init_lora_weights":"pissa_niter_4","use_rslora":true,"r":4,"lora_alpha":8,"target_modules":["query","value"],"rank_pattern":{"value":2}}"#),
        ("MiLoRA", #"{"peft_type":"LORA","init_lora_weights":"milora","r":4,"lora_alpha":8,"target_modules":["query","value"]}"#),
        ("SVFT plain", #"{"peft_type":"SVFT","pattern":"plain","target_modules":["query","value"]}"#),
        ("SVFT banded", #"{"peft_type":"SVFT","pattern":"banded","off_diag":2,"target_modules":["query","value"]}"#),
        ("SVFT random", #"{"peft_type":"SVFT","pattern":"random","off_diag":3,"target_modules":["query","value"]}"#),
        ("RoSA", #"{"peft_type":"ROSA","r":4,"lora_alpha":8,"density":0.01,"warmup_steps":1,"target_modules":["query","value"]}"#),
    ]

    static func batch() throws -> TokenBatch { try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 102]]) }

    /// Relative max-abs difference.
    static func relative(_ a: Tensor, _ b: Tensor) -> Float { maxAbsDifference(a, b) / max(1, b.scalars.map(abs).max() ?? 1) }

    @Test func svdReconstructsAndIsOrthonormal() throws {
        var rng = GraftRNG(seed: 1)
        for shape in [[7, 5], [5, 7], [6, 6], [1, 4]] {
            let a = Tensor.randomNormal(shape, rng: &rng)
            let (u, s, vt) = try svd(a, what: "test")
            let k = min(shape[0], shape[1])
            #expect(u.shape == [shape[0], k] && s.shape == [k] && vt.shape == [k, shape[1]])
            let rebuilt = matmul(u * s, vt)
            #expect(maxAbsDifference(rebuilt, a) < 1e-5, "\(shape)")
            for i in 1..<k { #expect(s.pointer[i - 1] >= s.pointer[i]) }
            #expect(maxAbsDifference(matmul(u, u, transposeA: true), Tensor.identityForTest(k)) < 1e-5)
            #expect(maxAbsDifference(matmul(vt, vt, transposeB: true), Tensor.identityForTest(k)) < 1e-5)
        }
        #expect(throws: GraftError.self) { try svd(Tensor(zeros: [3]), what: "vector") }
        #expect(throws: GraftError.self) { try svd(Tensor(shape: [2, 2], values: [1, .nan, 0, 1]), what: "nan") }
    }

    /// A fresh adapter of each method leaves the output at the base model's (LoRA-XS / SVFT / RoSA / asymmetric
    /// start at ΔW = 0; PiSSA and MiLoRA subtract their initial factors).
    @Test(arguments: configs.map(\.0))
    func freshAdapterKeepsTheBaseOutput(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        let bert = try Assets.loadMiniLM()
        let base = try withNoGrad { try bert.forward(try Self.batch()) }
        let model = AdaptedModel(root: bert)
        try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: method))
        let out = try withNoGrad { try bert.forward(try Self.batch()) }
        #expect(Self.relative(out, base) <= 1e-4, "\(method): \(Self.relative(out, base))")
    }

    /// Perturbed parameters: merging reproduces the unmerged output, unmerging restores the base weights, and a
    /// save → load round trip into a fresh model reproduces the output.
    @Test(arguments: configs.map(\.0))
    func mergeUnmergeAndSaveLoad(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        let bert = try Assets.loadMiniLM()
        let weights: [(String, Tensor)] = bert.namedModules().compactMap { entry in
            (entry.module as? Linear).map { (entry.name, $0.weight.copy()) }
        }
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: method), seed: 7)
        if let rosa = adapter.layers.first?.adapter as? RoSALayer {
            // Pick a mask from a gradient so the sparse part takes part.
            model.setTraining(true)
            sum(try bert.forward(try Self.batch())).backward()
            model.setTraining(false)
            adapter.afterBackward(step: 0)
            #expect(rosa.maskReady)
        }
        var rng = GraftRNG(seed: 5)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.02 * rng.nextNormal() } }
        let unmerged = try withNoGrad { try bert.forward(try Self.batch()) }
        try model.merge("default")
        let merged = try withNoGrad { try bert.forward(try Self.batch()) }
        #expect(Self.relative(merged, unmerged) <= 1e-5, "\(method) merged: \(Self.relative(merged, unmerged))")
        try model.unmerge("default")
        for (path, w) in weights {
            guard let lin = bert.namedModules().first(where: { $0.name == path })?.module as? Linear else { continue }
            #expect(maxAbsDifference(lin.weight, w) < 1e-6, "\(method) \(path) after unmerge")
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-variant-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try Assets.loadMiniLM()
        let loaded = try AdaptedModel(root: other).loadAdapter(directory: dir)
        let reloaded = try withNoGrad { try other.forward(try Self.batch()) }
        #expect(Self.relative(reloaded, unmerged) <= 1e-5, "\(method) reloaded: \(Self.relative(reloaded, unmerged))")
        if method.hasPrefix("PiSSA") || method == "MiLoRA" {
            // Written as the equivalent plain rank-2r LoRA.
            #expect(loaded.config.json["init_lora_weights"] as? Bool == true)
            #expect((loaded.layers.first?.adapter as? LoRALayer)?.initialFactors == nil)
        }
        if method.hasPrefix("asymmetric") {
            #expect(loaded.config.peftType == "LORA" && loaded.config.json["train_a"] as? Bool == false)
            #expect(loaded.layers.allSatisfy { $0.adapter is AsymmetricLoRALayer })
            #expect(loaded.parameterCount == adapter.parameterCount)
        }
    }

    /// PiSSA's s·BA is the best rank-r approximation of W (the top-r singular subspace); MiLoRA's is the bottom-r
    /// part; the two add up to the whole weight when r covers every singular value.
    @Test func pissaAndMiLoRASpanTheirSingularSubspaces() throws {
        var rng = GraftRNG(seed: 3)
        let proj = Linear(weight: Tensor.randomNormal([6, 5], rng: &rng), bias: nil)
        let root = ModuleList(typeName: "Toy", [("proj", proj)])
        let (u, s, vt) = try svd(proj.weight)
        func product(_ json: String) throws -> Tensor {
            let model = AdaptedModel(root: root)
            let a = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: "t"))
            guard let lora = a.layers.first?.adapter as? LoRALayer else { return Tensor(zeros: [1]) }
            #expect(lora.initialFactors != nil)
            return matmul(lora.loraB, lora.loraA) * lora.scaling
        }
        let top = try product(#"{"peft_type":"LORA","init_lora_weights":"pissa","r":2,"lora_alpha":3,"target_modules":["proj"]}"#)
        let topRef = matmul(u.slice(dim: 1, 0..<2) * s.slice(dim: 0, 0..<2), vt.slice(dim: 0, 0..<2))
        #expect(maxAbsDifference(top, topRef) < 1e-5)
        let bottom = try product(#"{"peft_type":"LORA","init_lora_weights":"milora","r":3,"lora_alpha":3,"target_modules":["proj"]}"#)
        let bottomRef = matmul(u.slice(dim: 1, 2..<5) * s.slice(dim: 0, 2..<5), vt.slice(dim: 0, 2..<5))
        #expect(maxAbsDifference(bottom, bottomRef) < 1e-5)
        #expect(maxAbsDifference(top + bottom, proj.weight) < 1e-5)
        #expect(throws: GraftError.self) {
            try AdaptedModel(root: root).addAdapter("big", config: AdapterConfig(jsonText: #"{"peft_type":"LORA","init_lora_weights":"pissa","r":6,"target_modules":["proj"]}"#, source: "t"))
        }
        #expect(throws: GraftError.self) {
            try AdaptedModel(root: root).addAdapter("bad", config: AdapterConfig(jsonText: #"{"peft_type":"LORA","init_lora_weights":"olora","target_modules":["proj"]}"#, source: "t"))
        }
    }

    /// CorDA: after collecting the covariance the output still equals the base; IPM's s·B₀A₀C equals the top-r
    /// part of W·C and KPM's the bottom-r part; save → load round trips.
    @Test(arguments: ["ipm", "kpm"])
    func cordaInitializesFromTheCovariance(mode: String) throws {
        let bert = try Assets.loadMiniLM()
        let base = try withNoGrad { try bert.forward(try Self.batch()) }
        let model = AdaptedModel(root: bert)
        let json = #"{"peft_type":"LORA","init_lora_weights":"corda","corda_config":{"corda_method":"\#(mode)"},"r":4,"lora_alpha":8,"target_modules":["query","value"]}"#
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: "corda"))
        try model.initializeCorDA("default") {
            _ = try bert.forward(try Self.batch())
            _ = try bert.forward(try TokenBatch(sequences: [[101, 2129, 2024, 2017, 1029, 102]]))
        }
        let out = try withNoGrad { try bert.forward(try Self.batch()) }
        #expect(Self.relative(out, base) <= 1e-4, "CorDA \(mode): \(Self.relative(out, base))")
        for (path, _, layer) in adapter.layers {
            guard let lora = layer as? LoRALayer, lora.initialFactors != nil else { Issue.record("\(path): not initialized"); continue }
            let norm = lora.loraB.scalars.map(abs).max() ?? 0
            #expect(norm > 0, "\(path): B stayed zero")
        }
        // The adapted directions: IPM takes the largest singular values of W·C, KPM the smallest; compare the
        // norms of s·BA·C for the first layer.
        var rng = GraftRNG(seed: 4)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.01 * rng.nextNormal() } }
        let trained = try withNoGrad { try bert.forward(try Self.batch()) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-corda-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try Assets.loadMiniLM()
        try AdaptedModel(root: other).loadAdapter(directory: dir)
        #expect(Self.relative(try withNoGrad { try other.forward(try Self.batch()) }, trained) <= 1e-5)
        #expect(throws: GraftError.self) { try model.initializeCorDA("default") {} }
    }

    /// CorDA's components on a toy layer: s·B₀A₀ = U_r S_r V_rᵀ C⁻¹ for the SVD of W·C (C damped).
    @Test func cordaComponentsMatchTheDecompositionOfWC() throws {
        var rng = GraftRNG(seed: 8)
        let proj = Linear(weight: Tensor.randomNormal([4, 5], rng: &rng), bias: nil)
        let root = ModuleList(typeName: "Toy", [("proj", proj)])
        let x = Tensor.randomNormal([9, 5], rng: &rng)
        for mode in ["ipm", "kpm"] {
            let model = AdaptedModel(root: root)
            let a = try model.addAdapter(mode, config: AdapterConfig(jsonText: #"{"peft_type":"LORA","init_lora_weights":"corda","corda_config":{"corda_method":"\#(mode)"},"r":2,"target_modules":["proj"]}"#, source: "t"))
            try model.initializeCorDA(mode) { _ = proj.forward(x) }
            guard let lora = a.layers.first?.adapter as? LoRALayer else { continue }
            var peak = -Float.infinity
            for v in x.scalars { peak = max(peak, v) }
            let xs = x * (1 / abs(peak))
            let c = matmul(xs, xs, transposeA: true)
            var mean: Float = 0
            for i in 0..<5 { mean += c.pointer[i * 5 + i] }
            mean /= 5
            for i in 0..<5 { c.pointer[i * 5 + i] += 0.01 * mean }
            let (u, s, vt) = try svd(matmul(proj.weight, c))
            let range = mode == "ipm" ? 0..<2 : 2..<4
            let ref = matmul(u.slice(dim: 1, range) * s.slice(dim: 0, range), vt.slice(dim: 0, range))
            let got = matmul(matmul(lora.loraB, lora.loraA) * lora.scaling, c)
            #expect(maxAbsDifference(got, ref) < 1e-3, "\(mode): \(maxAbsDifference(got, ref))")
            try model.deleteAdapter(mode)
        }
    }

    /// RoSA: the mask is the top-|gradient| entries after the warm-up steps (through the training hook), the
    /// sparse values train only afterwards, and their gradients match finite differences.
    @Test func rosaChoosesItsMaskFromWarmUpGradients() throws {
        var rng = GraftRNG(seed: 2)
        let proj = Linear(weight: Tensor.randomNormal([6, 8], rng: &rng), bias: nil)
        let root = ModuleList(typeName: "Toy", [("proj", proj)])
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("r", config: AdapterConfig(jsonText: #"{"peft_type":"ROSA","r":2,"density":0.125,"warmup_steps":2,"target_modules":["proj"]}"#, source: "rosa"))
        guard let rosa = adapter.layers.first?.adapter as? RoSALayer else { Issue.record("not RoSA"); return }
        #expect(rosa.values.count == 6)
        let x = Tensor.randomNormal([3, 8], rng: &rng)
        let w = Tensor.randomNormal([3, 6], rng: &rng)
        var expected = [Float](repeating: 0, count: 48)
        for step in 0..<2 {
            model.setTraining(true)
            sum(proj.forward(x) * w * Float(step + 1)).backward()
            model.setTraining(false)
            #expect(rosa.values.grad.map { $0.scalars.allSatisfy { $0 == 0 } } ?? true, "values train before the mask")
            // ∂L/∂ΔW = wᵀ x for this objective.
            let g = matmul(w * Float(step + 1), x, transposeA: true)
            for i in 0..<48 { expected[i] += g.pointer[i] * g.pointer[i] }
            #expect(!rosa.maskReady)
            adapter.afterBackward(step: step)
            for (_, p) in adapter.peftStateDict { p.grad = nil }
        }
        #expect(rosa.maskReady)
        let top = Array(expected.indices.sorted { expected[$0] > expected[$1] }.prefix(6)).sorted()
        #expect(rosa.integerBuffers.first?.values == top.map { Int32($0 / 8) } + top.map { Int32($0 % 8) })
        // After the mask: finite differences of every parameter.
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        func objective() -> Double { zip(withNoGrad { proj.forward(x) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) } }
        sum(proj.forward(x) * w).backward()
        let check = finiteDifferenceCheck(adapter.peftStateDict, step: 1e-2, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty, "RoSA: no gradient for \(check.missing)")
        #expect(check.worst < 2e-3, "RoSA worst gradient error \(check.worst)")
        #expect(throws: GraftError.self) {
            try AdaptedModel(root: root).addAdapter("w", config: AdapterConfig(jsonText: #"{"peft_type":"ROSA","warmup_steps":0,"target_modules":["proj"]}"#, source: "rosa"))
        }
    }

    /// A trainer checkpoint of an SVD-initialized LoRA (written in the converted rank-2r form) loads back into an
    /// adapter created with the same config; a RoSA adapter saved during its warm-up loads without a mask.
    @Test func checkpointsOfPiSSAAndWarmingUpRoSALoadBack() throws {
        for json in [#"{"peft_type":"LORA","init_lora_weights":"pissa","r":4,"lora_alpha":8,"target_modules":["query","value"]}"#,
                     #"{"peft_type":"ROSA","r":4,"density":0.01,"warmup_steps":3,"target_modules":["query","value"]}"#] {
            let bert = try Assets.loadMiniLM()
            let model = AdaptedModel(root: bert)
            let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: "ckpt"), seed: 3)
            var rng = GraftRNG(seed: 6)
            for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.02 * rng.nextNormal() } }
            let out = try withNoGrad { try bert.forward(try Self.batch()) }
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-ckpt-\(UUID().uuidString)").path
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try model.saveAdapter("default", directory: dir)
            let other = try Assets.loadMiniLM()
            let otherModel = AdaptedModel(root: other)
            let fresh = try otherModel.addAdapter("default", config: AdapterConfig(jsonText: json, source: "ckpt"), seed: 9)
            try otherModel.loadWeights(try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors"), into: fresh)
            #expect(Self.relative(try withNoGrad { try other.forward(try Self.batch()) }, out) <= 1e-5, "\(json)")
            for ((key, x), (_, y)) in zip(adapter.peftStateDict, fresh.peftStateDict) { #expect(x.scalars == y.scalars, "\(key)") }
            if let rosa = fresh.layers.first?.adapter as? RoSALayer { #expect(!rosa.maskReady) }
        }
    }

    /// Bad configs fail naming the key.
    @Test func configErrorsNameTheKey() throws {
        var rng = GraftRNG(seed: 2)
        let root = ModuleList(typeName: "Toy", [("proj", Linear(weight: Tensor.randomNormal([4, 4], rng: &rng), bias: nil))])
        for (json, key) in [(#"{"peft_type":"SVFT","pattern":"diagonal","target_modules":["proj"]}"#, "pattern"),
                            (#"{"peft_type":"SVFT","off_diag":-1,"target_modules":["proj"]}"#, "off_diag"),
                            (#"{"peft_type":"ROSA","density":2,"target_modules":["proj"]}"#, "density"),
                            (#"{"peft_type":"LORAXS","r":5,"target_modules":["proj"]}"#, "rank 5"),
                            (#"{"peft_type":"ASYMMETRIC_LORA","r":5,"target_modules":["proj"]}"#, "rank 5"),
                            (#"{"peft_type":"LORA","init_lora_weights":"corda","corda_config":{"corda_method":"xpm"},"target_modules":["proj"]}"#, "corda_method")] {
            do {
                try AdaptedModel(root: root).addAdapter("x", config: AdapterConfig(jsonText: json, source: "cfg"))
                Issue.record("accepted \(json)")
            } catch let e as GraftError {
                #expect(e.message.contains(key), "\(e.message)")
            }
        }
    }
}

extension Tensor {
    /// `[n, n]` identity.
    static func identityForTest(_ n: Int) -> Tensor {
        Tensor(shape: [n, n], values: (0..<(n * n)).map { $0 / n == $0 % n ? 1 : 0 })
    }
}
