import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// PEFT's `add_weighted_adapter` (peft 0.21.2) on MiniLM: each fixture holds PEFT's combined adapter and the
/// adapted model's `last_hidden_state`; Graft's combination must reproduce the output and save PEFT's keys.
@Suite(.serialized) struct AdapterCombinationTests {
    static let fixtures = ["linear", "cat", "negation_cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]

    /// MiniLM with the fixture's source adapters `a` (r4 α8), `b` (r6 α6), `b4` (r4 α8) loaded.
    static func modelWithSources() throws -> (BertModel, AdaptedModel) {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        for name in ["a", "b", "b4"] {
            try model.loadAdapter(directory: Assets.fixture("peft-minilm-merge/\(name)"), name: name)
        }
        return (bert, model)
    }

    static func manifestEntry(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Assets.fixture("peft-minilm-merge/manifest.json")))
        let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        guard let entry = (manifest?["combinations"] as? [String: Any])?[name] as? [String: Any] else {
            throw GraftError.format("manifest.json: no combination '\(name)'")
        }
        return entry
    }

    static func request(_ entry: [String: Any]) throws -> AdapterCombination {
        guard let adapters = entry["adapters"] as? [String], let weights = entry["weights"] as? [Double],
              let type = entry["combination_type"] as? String else { throw GraftError.format("manifest entry \(entry)") }
        return AdapterCombination(adapters: adapters, weights: weights, type: try CombinationType(peftName: type),
                                  density: entry["density"] as? Double)
    }

    static func output(_ bert: BertModel) throws -> Tensor {
        let inputs = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm-merge/inputs.safetensors"))
        return try withNoGrad { try bert.forward(try fixtureBatch(inputs)) }
    }

    static func expected(_ dir: String) throws -> Tensor {
        try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm-merge/\(dir)/expected.safetensors")).tensor("last_hidden_state")
    }

    @Test(arguments: fixtures)
    func combinationReproducesPEFT(fixture name: String) throws {
        let (bert, model) = try Self.modelWithSources()
        let request = try Self.request(try Self.manifestEntry(name))
        let report = try model.addWeightedAdapter("merged", combining: request)
        #expect(model.activeAdapter == "b4", "PEFT leaves the active adapter as it was")
        try model.setActiveAdapter("merged")
        let err = maxAbsDifference(try Self.output(bert), try Self.expected(name))
        // The saved adapter: PEFT's keys, shapes, r and lora_alpha.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-combine-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("merged", directory: dir)
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let peft = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm-merge/\(name)/adapter_model.safetensors"))
        #expect(Set(saved.names) == Set(peft.names))
        var factorErr: Float = 0
        for key in peft.names {
            #expect(saved.info(key)?.shape == peft.info(key)?.shape, "\(key)")
            // Factors are unique except for SVD's signs: compare them directly where no SVD is involved.
            if !request.type.usesSVD { factorErr = worse(factorErr, maxAbsDifference(try saved.tensor(key), try peft.tensor(key))) }
        }
        let savedConfig = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        let peftConfig = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Assets.fixture("peft-minilm-merge/\(name)/adapter_config.json")))) as? [String: Any]
        #expect(savedConfig?["r"] as? Int == peftConfig?["r"] as? Int && savedConfig?["r"] as? Int == report.rank)
        #expect(savedConfig?["lora_alpha"] as? Int == peftConfig?["lora_alpha"] as? Int)
        #expect(Set(savedConfig?["target_modules"] as? [String] ?? []) == Set(peftConfig?["target_modules"] as? [String] ?? ["?"]))
        print("combine \(name): r=\(report.rank), output max-abs vs PEFT \(err)" + (request.type.usesSVD ? "" : ", factors max-abs \(factorErr)"))
        #expect(err <= 1e-4)
        if !request.type.usesSVD { #expect(factorErr <= 1e-5) }
        // Reloading the saved directory gives the same function.
        let again = AdaptedModel(root: try Assets.loadMiniLM())
        try again.loadAdapter(directory: dir)
        guard let reloaded = again.root as? BertModel else { throw GraftError.format("root is not BERT") }
        #expect(maxAbsDifference(try Self.output(reloaded), try Self.expected(name)) <= 1e-4)
    }

    /// At density 1 DARE prunes nothing (PEFT's `prune` returns the tensor), so the DARE types must equal their
    /// deterministic counterparts' fixtures.
    @Test(arguments: [("dare_linear", "linear"), ("dare_linear_svd", "svd")])
    func dareAtFullDensityIsItsDeterministicCounterpart(dare: String, fixture: String) throws {
        let (bert, model) = try Self.modelWithSources()
        var request = try Self.request(try Self.manifestEntry(fixture))
        request.type = try CombinationType(peftName: dare)
        request.density = 1
        try model.addWeightedAdapter("merged", combining: request)
        try model.setActiveAdapter("merged")
        let err = maxAbsDifference(try Self.output(bert), try Self.expected(fixture))
        print("combine \(dare) at density 1: output max-abs vs PEFT's \(fixture) \(err)")
        #expect(err <= 1e-4)
    }

    /// DARE keeps each entry with probability `density`, rescales survivors by 1/density, and a seed fixes it.
    @Test(arguments: ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
    func dareKeepsTheDensityAndIsDeterministicUnderASeed(type: String) throws {
        let (bert, model) = try Self.modelWithSources()
        let density = 0.3
        func combine(_ name: String, seed: UInt64) throws -> CombinationReport {
            try model.addWeightedAdapter(name, combining: AdapterCombination(
                adapters: ["a", "b4"], weights: [0.7, 0.5], type: try CombinationType(peftName: type), density: density, seed: seed))
        }
        let first = try combine("m1", seed: 7), second = try combine("m2", seed: 7), other = try combine("m3", seed: 8)
        let kept = try #require(first.keptFraction)
        print("combine \(type) density \(density): kept fraction \(kept)")
        #expect(abs(kept - density) < 0.01)
        #expect(second.keptFraction == first.keptFraction)
        func tensors(_ r: CombinationReport) -> [Tensor] { r.adapter.peftStateDict.map(\.tensor) }
        let same = worstOf(zip(tensors(first), tensors(second)).map { maxAbsDifference($0, $1) }, empty: .nan)
        let differs = worstOf(zip(tensors(first), tensors(other)).map { maxAbsDifference($0, $1) }, empty: .nan)
        #expect(same == 0, "the same seed must give the same adapter")
        #expect(differs > 0, "another seed must draw other masks")
        try model.setActiveAdapter("m1")
        let out = try Self.output(bert)
        #expect((0..<out.count).allSatisfy { out.pointer[$0].isFinite })
    }

    @Test func randomPruningRescalesSurvivorsByTheInverseDensity() {
        let n = 20_000
        let x = Tensor(shape: [n], values: (0..<n).map { Float($0 % 97) - 48.5 })
        var merge = TaskVectorMerge(sparsification: .random, electSign: false, density: 0.25, signMethod: .total)
        var rng = GraftRNG(seed: 3)
        let y = merge.merge([x], weights: [1], rng: &rng)
        var kept = 0
        for i in 0..<n {
            let v = y.pointer[i]
            if v != 0 { kept += 1; #expect(v == x.pointer[i] / 0.25) }
        }
        let fraction = Double(kept) / Double(n)
        print("random pruning density 0.25: kept fraction \(fraction)")
        #expect(abs(fraction - 0.25) < 0.015 && merge.keptEntries == kept && merge.drawnEntries == n)
    }

    @Test func tiesElectsSignsByTotalOrFrequency() {
        // Entry 0: signs +,+,− with total −: "total" elects −, "frequency" elects +.
        let t1 = Tensor(shape: [2], values: [1, 2]), t2 = Tensor(shape: [2], values: [1, -3]), t3 = Tensor(shape: [2], values: [-5, 0])
        var rng = GraftRNG(seed: 0)
        var total = TaskVectorMerge(sparsification: .none, electSign: true, density: 1, signMethod: .total)
        var frequency = TaskVectorMerge(sparsification: .none, electSign: true, density: 1, signMethod: .frequency)
        let byTotal = total.merge([t1, t2, t3], weights: [1, 1, 2], rng: &rng)
        let byFrequency = frequency.merge([t1, t2, t3], weights: [1, 1, 2], rng: &rng)
        #expect(byTotal.pointer[0] == -10 && byTotal.pointer[1] == -3)
        // Entry 1 by frequency: signs +1, −1, 0 sum to 0, a tie, so + is elected and only t1's 2 agrees.
        #expect(byFrequency.pointer[0] == 1 && byFrequency.pointer[1] == 2)
    }

    @Test func magnitudePruningKeepsTheLargestFraction() {
        let x = Tensor(shape: [6], values: [0.1, -4, 2, -0.5, 3, 0])
        TaskVectorMerge.keepLargest(x.pointer, count: 6, k: Int(0.5 * 6))
        #expect((0..<6).map { x.pointer[$0] } == [0, -4, 2, 0, 3, 0])
    }

    @Test func badRequestsNameTheFieldAndLeaveNoAdapter() throws {
        let (_, model) = try Self.modelWithSources()
        func expectError(_ request: AdapterCombination, name: String = "merged", mentions: String) {
            do {
                try model.addWeightedAdapter(name, combining: request)
                Issue.record("accepted: \(request)")
            } catch let e as GraftError {
                #expect(e.message.contains(mentions), "\(e.message)")
            } catch { Issue.record("\(error)") }
            #expect(model.adapters.map(\.name) == ["a", "b", "b4"])
        }
        expectError(AdapterCombination(adapters: ["a", "b4"], weights: [1]), mentions: "weights")
        expectError(AdapterCombination(adapters: ["a", "nope"], weights: [1, 1]), mentions: "nope")
        expectError(AdapterCombination(adapters: ["a", "b"], weights: [1, 1], type: .linear), mentions: "b: r=6")
        expectError(AdapterCombination(adapters: ["a", "b4"], weights: [1, 1], type: .ties), mentions: "density")
        expectError(AdapterCombination(adapters: ["a", "b4"], weights: [1, .nan], type: .linear), mentions: "'b4'")
        expectError(AdapterCombination(adapters: ["a", "b4"], weights: [1, 1], type: .svd, svdRank: 1000), mentions: "svd_rank")
        expectError(AdapterCombination(adapters: ["a", "b4"], weights: [1, 1], type: .linear), name: "b", mentions: "'b'")
        #expect(throws: GraftError.self) { try CombinationType(peftName: "average") }
        #expect(throws: GraftError.self) { try MajoritySignMethod(peftName: "sum") }
    }

    @Test func svdClampLimitsTheFactorsToTheQuantile() throws {
        let (_, model) = try Self.modelWithSources()
        let report = try model.addWeightedAdapter("clamped", combining: AdapterCombination(
            adapters: ["a", "b"], weights: [0.7, 0.5], type: .svd, svdRank: 3, svdClamp: 0.9))
        #expect(report.rank == 3)
        for (_, _, layer) in report.adapter.layers {
            guard let lora = layer as? LoRALayer else { continue }
            let all = (0..<lora.loraA.count).map { lora.loraA.pointer[$0] } + (0..<lora.loraB.count).map { lora.loraB.pointer[$0] }
            let hi = try #require(all.max())
            // After clamping, at least 10% of the entries sit at the clamp value.
            #expect(Double(all.filter { $0 == hi }.count) >= 0.09 * Double(all.count))
            #expect(all.allSatisfy { $0.isFinite && $0 >= -hi })
        }
    }
}

/// IA³ combines as PEFT's `IA3Model.add_weighted_adapter` means to: a weighted sum of the scaling vectors.
@Suite(.serialized) struct IA3CombinationTests {
    @Test func weightsSummingToOneReproduceTheSourceAndOthersScaleIt() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let dir = Assets.fixture("peft-minilm/ia3")
        try model.loadAdapter(directory: dir, name: "x")
        try model.loadAdapter(directory: dir, name: "y")
        let base = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
        let expected = try SafeTensorsFile(contentsOf: dir + "/expected.safetensors").tensor("last_hidden_state")
        let report = try model.addWeightedAdapter("mix", combining: AdapterCombination(adapters: ["x", "y"], weights: [0.3, 0.7]))
        #expect(report.type == .linear && report.rank == 0 && model.activeAdapter == "y")
        try model.setActiveAdapter("mix")
        let err = maxAbsDifference(try withNoGrad { try bert.forward(try fixtureBatch(base)) }, expected)
        print("combine ia3 0.3·l + 0.7·l: output max-abs vs PEFT's ia3 fixture \(err)")
        #expect(err <= 1e-4)
        let doubled = try model.addWeightedAdapter("double", combining: AdapterCombination(adapters: ["x", "y"], weights: [1, 1]))
        let sourceLayers = try model.adapter("x").layers
        for ((_, _, s), (_, _, d)) in zip(sourceLayers, doubled.adapter.layers) {
            guard let s = s as? IA3Layer, let d = d as? IA3Layer else { Issue.record("not IA3"); continue }
            #expect((0..<s.scale.count).allSatisfy { d.scale.pointer[$0] == 2 * s.scale.pointer[$0] })
        }
        #expect(throws: GraftError.self) {
            try model.addWeightedAdapter("t", combining: AdapterCombination(adapters: ["x", "y"], weights: [1, 1], type: .ties, density: 0.5))
        }
    }
}
