import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// Catalog methods beyond LoRA: PEFT's adapter files reproduce PEFT's outputs, merge where mergeable, and
/// survive a save → load round trip.
@Suite(.serialized) struct MethodParityTests {
    static let methods = ["ia3", "loha", "lokr", "vera", "hra", "miss", "road", "adalora", "shira", "oft", "vblora", "c3a", "ln_tuning", "trainable_tokens", "prompt_tuning", "p_tuning", "prefix_tuning", "boft", "fourierft", "poly", "mhr"]

    func base() throws -> SafeTensorsFile {
        try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
    }

    func trainableCount(_ name: String) throws -> Int? {
        let data = try Data(contentsOf: URL(fileURLWithPath: Assets.fixture("peft-minilm/manifest.json")))
        let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        return ((manifest?["methods"] as? [String: Any])?[name] as? [String: Any])?["trainable"] as? Int
    }

    /// Routes each sequence to the task PEFT used (Poly / MHR fixtures store `task_ids` with the expected output).
    func applyTaskIDs(_ model: AdaptedModel, method: String) throws {
        let file = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/\(method)/expected.safetensors"))
        guard file.contains("task_ids") else { return }
        try model.setTaskIDs(try file.int64s("task_ids").map { Int($0) })
    }

    @Test(arguments: methods)
    func outputMatchesPEFT(method: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.loadAdapter(directory: Assets.fixture("peft-minilm/\(method)"))
        try applyTaskIDs(model, method: method)
        let expected = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/\(method)/expected.safetensors")).tensor("last_hidden_state")
        let out = try withNoGrad { try bert.forward(try fixtureBatch(try base())) }
        let err = maxAbsDifference(out, expected)
        print("\(method): max-abs error vs PEFT \(err) (\(adapter.layers.count) layers, \(adapter.parameterCount) trainable)")
        #expect(err <= 1e-4)
        // P-tuning is loaded in its inference form (the encoder's output); PEFT counts the encoder it trains.
        if method != "p_tuning" {
            #expect(adapter.parameterCount == (try trainableCount(method)), "trainable parameter count differs from PEFT's")
        }
        let plain = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(try fixtureBatch(try base())) } }
        #expect(maxAbsDifference(plain, expected) > 1e-3)
    }

    @Test(arguments: methods)
    func mergeUnmergeAndRoundTrip(method: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        try model.loadAdapter(directory: Assets.fixture("peft-minilm/\(method)"))
        try applyTaskIDs(model, method: method)
        let forward = { try withNoGrad { try bert.forward(try fixtureBatch(try self.base())) } }
        let unmerged = try forward()
        if ["prompt_tuning", "p_tuning", "prefix_tuning", "poly", "mhr"].contains(method) {
            #expect(throws: GraftError.self) { try model.merge("default") }
        } else {
            try checkMerge(model, forward: forward, unmerged: unmerged)
        }
        try checkRoundTrip(model, method: method, unmerged: unmerged)
    }

    func checkMerge(_ model: AdaptedModel, forward: () throws -> Tensor, unmerged: Tensor) throws {
        try model.merge("default")
        // Relative to the output's scale: merging reorders float32 sums, and methods that move the output far
        // (MiSS by 2.3) carry that rounding through six layers. Each layer's ΔW is checked alone, tightly, below.
        let scale = max(1, unmerged.scalars.map(abs).max() ?? 1)
        let mergedError = maxAbsDifference(try forward(), unmerged)
        #expect(mergedError / scale <= 2e-5, "merged output differs by \(mergedError) (scale \(scale))")
        try model.unmerge("default")
        let unmergedError = maxAbsDifference(try forward(), unmerged)
        #expect(unmergedError / scale <= 2e-5, "unmerged output differs by \(unmergedError) (scale \(scale))")
    }

    func checkRoundTrip(_ model: AdaptedModel, method: String, unmerged: Tensor) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-\(method)-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try Assets.loadMiniLM()
        let reloaded = AdaptedModel(root: other)
        try reloaded.loadAdapter(directory: dir)
        try applyTaskIDs(reloaded, method: method)
        #expect(maxAbsDifference(try withNoGrad { try other.forward(try fixtureBatch(try base())) }, unmerged) == 0)
        let saved = Set(try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors").names)
        let original = Set(try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/\(method)/adapter_model.safetensors")).names)
        #expect(saved == original)
    }

    @Test func torchRandpermReproducesMT19937AndShuffles() throws {
        // The C++ standard's check value for mt19937 with the default seed: the 10000th output.
        var mt = TorchRandperm.MT19937(seed: 5489)
        var last: UInt32 = 0
        for _ in 0..<10_000 { last = mt.next() }
        #expect(last == 4_123_659_995)
        let full = try TorchRandperm.prefix(50, of: 50, seed: 777)
        #expect(full.sorted() == Array(0..<50) && full != Array(0..<50))
        #expect(try TorchRandperm.prefix(20, of: 50, seed: 777) == Array(full.prefix(20)))
        #expect(throws: GraftError.self) { try TorchRandperm.prefix(1, of: Int(UInt32.max), seed: 0) }
    }

    @Test func polyRejectsOutOfRangeTaskIDsAndBOFTReadsOtherFactorCounts() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        try model.loadAdapter(directory: Assets.fixture("peft-minilm/poly"))
        #expect(throws: GraftError.self) { try model.setTaskIDs([0, 3]) }
        #expect(throws: GraftError.self) { try model.merge("default") }
        // The fixture routes its second sequence to task 2; task 0 for both must miss it.
        try model.setTaskIDs([0, 0])
        let expected = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/poly/expected.safetensors")).tensor("last_hidden_state")
        let out = try withNoGrad { try bert.forward(try fixtureBatch(try base())) }
        #expect(maxAbsDifference(out, expected) > 1e-4)
        // The BOFT fixture's config asks for two butterfly factors, PEFT on CPU saved one.
        let boft = try AdaptedModel(root: try Assets.loadMiniLM()).loadAdapter(directory: Assets.fixture("peft-minilm/boft"))
        #expect(boft.layers.allSatisfy { ($0.adapter as? BOFTLayer)?.rotation.shape.first == 1 })
    }

    /// PEFT cannot write a multi-factor BOFT fixture on CPU, so the butterfly path is checked by its properties:
    /// PEFT's permutation, an orthogonal rotation, and a merge that reproduces the layer.
    @Test func boftButterflyFactorsAreOrthogonalAndMerge() throws {
        #expect(try BOFTLayer.butterflyPermutations(inFeatures: 8, blockSize: 4, blocks: 2, factors: 2)
                == [Array(0..<8), [0, 1, 4, 5, 2, 3, 6, 7]])
        var rng = GraftRNG(seed: 4)
        let proj = Linear(weight: Tensor.randomNormal([6, 16], rng: &rng), bias: Tensor.randomNormal([6], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let json = #"{"peft_type":"BOFT","boft_block_size":4,"boft_block_num":0,"boft_n_butterfly_factor":3,"init_weights":false,"target_modules":["proj"]}"#
        let adapter = try model.addAdapter("b", config: AdapterConfig(jsonText: json, source: "boft"))
        guard let layer = adapter.layers.first?.adapter as? BOFTLayer else { Issue.record("no BOFT layer"); return }
        #expect(layer.rotation.shape == [3, 4, 4, 4])
        let m = withNoGrad { layer.denseRotation(layer.blocksQ()) }
        let mtm = withNoGrad { matmul(m, m, transposeA: true) }
        let eye = Tensor(shape: [16, 16], values: (0..<256).map { $0 % 17 == 0 ? 1 : 0 })
        #expect(maxAbsDifference(mtm, eye) < 1e-5)
        let x = Tensor.randomNormal([5, 16], rng: &rng)
        let unmerged = withNoGrad { proj.forward(x) }
        try model.merge("b")
        #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, unmerged) < 1e-5)
        try model.unmerge("b")
        #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, unmerged) < 1e-5)
    }

    @Test func lokrFactorizationFollowsPEFT() {
        #expect(LoKrLayer.factorization(256, factor: -1) == (16, 16))
        #expect(LoKrLayer.factorization(128, factor: -1) == (8, 16))
        #expect(LoKrLayer.factorization(127, factor: -1) == (1, 127))
        #expect(LoKrLayer.factorization(128, factor: 4) == (4, 32))
        #expect(LoKrLayer.factorization(384, factor: -1) == (16, 24))
        #expect(LoKrLayer.factorization(1536, factor: -1) == (32, 48))
    }
}

@Suite struct SingleLayerMergeTests {
    /// ΔW reproduces each layer's adapted output on its own (no accumulation through the encoder).
    @Test(arguments: ["ia3", "loha", "lokr", "vera", "hra", "miss", "road", "adalora", "shira", "oft", "vblora", "c3a", "randlora", "lora", "dora", "boft", "fourierft"])
    func deltaWeightReproducesTheLayer(method: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.loadAdapter(directory: Assets.fixture("peft-minilm/\(method)"))
        expectDeltaWeightReproducesLayers(adapter, method: method)
    }
}

/// On the first three adapted layers of `adapter`: the base Linear with ΔW (and Δbias) folded in gives what the
/// adapted layer gives, within 1e-5 of the output's scale (NaN or Inf in either fails).
func expectDeltaWeightReproducesLayers(_ adapter: NamedAdapter, method: String,
                                       sourceLocation: SourceLocation = #_sourceLocation) {
    var rng = GraftRNG(seed: 9)
    for (path, lin, layer) in adapter.layers.prefix(3) {
        let x = Tensor.randomNormal([4, lin.inFeatures], rng: &rng)
        let adapted = withNoGrad { lin.forward(x) }
        guard let dw = layer.deltaWeight(base: lin) else { Issue.record("\(method) has no ΔW", sourceLocation: sourceLocation); continue }
        let bias = lin.bias.map { b in withNoGrad { b + (layer.deltaBias(base: lin) ?? Tensor(zeros: b.shape)) } }
        let merged = withNoGrad { linear(x, lin.weight + dw, bias) }
        let scale = max(1, adapted.scalars.map(abs).max() ?? 1)
        #expect(maxAbsDifference(adapted, merged) / scale < 1e-5, "\(method) \(path): \(maxAbsDifference(adapted, merged))",
                sourceLocation: sourceLocation)
    }
}
