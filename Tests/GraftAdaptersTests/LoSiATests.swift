import Foundation
import Testing
import Graft
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// LoSiA: the sub-network is the rows and columns with the largest gradient magnitude, only it changes while
/// training, re-localization folds it into the frozen delta (the function is unchanged) and moves to the current
/// gradient's rows and columns with fresh optimizer state; gradients, merge and save → load.
@Suite struct LoSiATests {
    static let json = #"{"peft_type":"LOSIA","rank_factor":0.25,"score_steps":1,"relocalize_every":3,"target_modules":["proj"]}"#

    static func toy() -> (Linear, AdaptedModel, NamedAdapter, LoSiALayer)? {
        var rng = GraftRNG(seed: 9)
        let proj = Linear(weight: Tensor.randomNormal([8, 8], std: 0.5, rng: &rng), bias: Tensor.randomNormal([8], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        guard let adapter = try? model.addAdapter("a", config: AdapterConfig(jsonText: json, source: "losia"), seed: 3),
              let layer = adapter.layers.first?.adapter as? LoSiALayer else { return nil }
        return (proj, model, adapter, layer)
    }

    /// The rows with the largest Σ_j |G_ij| and, over those rows, the columns with the largest Σ_i |G_ij|, where
    /// `G = wᵀ x` is the gradient of `Σ w ⊙ (W x)` with respect to W (computed here in Float64).
    static func expectedSubnet(x: Tensor, w: Tensor, k: Int) -> (rows: [Int32], columns: [Int32]) {
        let n = x.shape[0], inF = x.shape[1], outF = w.shape[1]
        var g = [Double](repeating: 0, count: outF * inF)
        for t in 0..<n { for i in 0..<outF { for j in 0..<inF { g[i * inF + j] += Double(w.pointer[t * outF + i]) * Double(x.pointer[t * inF + j]) } } }
        let rowSum = (0..<outF).map { i in (0..<inF).reduce(0.0) { $0 + abs(g[i * inF + $1]) } }
        let rows = rowSum.indices.sorted { rowSum[$0] > rowSum[$1] }.prefix(k).sorted()
        let colSum = (0..<inF).map { j in rows.reduce(0.0) { $0 + abs(g[$1 * inF + j]) } }
        let cols = colSum.indices.sorted { colSum[$0] > colSum[$1] }.prefix(k).sorted()
        return (rows.map(Int32.init), cols.map(Int32.init))
    }

    /// One training-mode forward and backward of `Σ w ⊙ proj(x)`.
    static func backward(_ proj: Linear, _ model: AdaptedModel, x: Tensor, w: Tensor) {
        model.setTraining(true)
        sum(proj.forward(x) * w).backward()
        model.setTraining(false)
    }

    @Test func localizesTrainsOnlyTheSubnetAndRelocalizes() throws {
        let (proj, model, adapter, layer) = try #require(Self.toy())
        var rng = GraftRNG(seed: 4)
        let x = Tensor.randomNormal([5, 8], rng: &rng), w1 = Tensor.randomNormal([5, 8], rng: &rng)
        #expect(!layer.located)
        Self.backward(proj, model, x: x, w: w1)
        adapter.afterBackward(step: 0)
        #expect(!layer.located, "localization waits for the optimizer update")
        layer.didUpdate(step: 1, totalSteps: 10)
        #expect(layer.located && layer.takeParametersToReset().count == 1)
        let first = Self.expectedSubnet(x: x, w: w1, k: 2)
        #expect(layer.rows == first.rows && layer.columns == first.columns, "rows \(layer.rows) columns \(layer.columns), expected \(first)")

        // Two optimizer steps on the sub-matrix: only its rows × columns of ΔW change.
        let optimizer = AdamW(parameters: adapter.peftStateDict.map(\.tensor), learningRate: 0.05, weightDecay: 0)
        for step in 2...3 {
            layer.sub.grad = nil
            Self.backward(proj, model, x: x, w: w1)
            adapter.afterBackward(step: step - 1)
            optimizer.step()
            adapter.trainingHooks.forEach { $0.didUpdate(step: step, totalSteps: 10) }
        }
        // Step 3 re-localized on the same objective: the same rows and columns, the block folded in.
        #expect(layer.rows == first.rows && layer.columns == first.columns)
        #expect(layer.sub.scalars.allSatisfy { $0 == 0 } && layer.takeParametersToReset().count == 1)
        let delta = try #require(layer.deltaWeight(base: proj))
        for i in 0..<8 {
            for j in 0..<8 {
                let inside = first.rows.contains(Int32(i)) && first.columns.contains(Int32(j))
                #expect((delta.pointer[i * 8 + j] != 0) == inside, "ΔW[\(i), \(j)] = \(delta.pointer[i * 8 + j])")
            }
        }
        #expect(layer.takeParametersToReset().isEmpty)

        // Step 6 re-localizes: its backward (probe on) scores a different objective.
        let w2 = Tensor.randomNormal([5, 8], rng: &rng)
        for step in 4...5 { layer.didUpdate(step: step, totalSteps: 10) }
        Self.backward(proj, model, x: x, w: w2)
        adapter.afterBackward(step: 5)
        optimizer.step()
        let before = try #require(layer.deltaWeight(base: proj))
        layer.didUpdate(step: 6, totalSteps: 10)
        let second = Self.expectedSubnet(x: x, w: w2, k: 2)
        #expect(layer.rows == second.rows && layer.columns == second.columns)
        #expect(layer.sub.scalars.allSatisfy { $0 == 0 })
        #expect(maxAbsDifference(try #require(layer.deltaWeight(base: proj)), before) < 1e-7, "re-localization keeps the function")
        #expect(layer.takeParametersToReset().map(ObjectIdentifier.init) == [ObjectIdentifier(layer.sub)])
    }

    /// Through the Trainer: the optimizer forgets the moved sub-matrix's moments, and the frozen delta changes
    /// only at re-localization steps.
    @Test func trainerResetsTheMovedSubMatrixState() throws {
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
        let model = AdaptedModel(root: classifier)
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: #"{"peft_type":"LOSIA","rank_factor":0.05,"relocalize_every":3,"target_modules":["query"]}"#, source: "losia"), seed: 1)
        var config = TrainerConfig()
        config.batchSize = 2
        config.learningRate = 1e-2
        let trainer = try Trainer(model: model, adapterName: "default", objective: SequenceClassificationObjective(model: classifier), config: config)
        let batch = try PackedBatch(ArraySlice([TokenizedExample(ids: [101, 7592, 2088, 102], label: 1), TokenizedExample(ids: [101, 2023, 102], label: 2)]))
        let layers = adapter.layers.compactMap { $0.adapter as? LoSiALayer }
        for step in 1...6 {
            let frozen = layers.map { $0.accumulated.copy() }
            _ = try trainer.accumulate(batch)
            try trainer.optimizerStep(totalSteps: 6)
            let changed = zip(layers, frozen).contains { maxAbsDifference($0.accumulated, $1) > 0 }
            // The first localization (after step 1) and the re-localizations fold the trained block in.
            #expect(changed == (step == 1 || step % 3 == 0), "step \(step): frozen delta changed \(changed)")
            if step == 1 || step % 3 == 0 {
                let state = trainer.optimizer.stateDict()
                #expect((0..<layers.count).allSatisfy { state["m.\($0)"]?.allSatisfy { $0 == 0 } == true }, "moments reset at step \(step)")
            }
        }
    }

    @Test func gradientsMatchFiniteDifferencesAndMergeAndSaveRoundTrip() throws {
        let (proj, model, adapter, layer) = try #require(Self.toy())
        var rng = GraftRNG(seed: 6)
        let x = Tensor.randomNormal([3, 8], rng: &rng).requiringGrad(), w = Tensor.randomNormal([3, 8], rng: &rng)
        Self.backward(proj, model, x: x.detached(), w: w)
        adapter.afterBackward(step: 0)
        layer.didUpdate(step: 1, totalSteps: 10)
        for i in 0..<layer.sub.count { layer.sub.pointer[i] = 0.3 * rng.nextNormal() }
        for i in 0..<layer.accumulated.count { layer.accumulated.pointer[i] = 0.1 * rng.nextNormal() }
        layer.sub.grad = nil
        func objective() -> Double {
            let out = withNoGrad { proj.forward(x.detached()) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(proj.forward(x) * w).backward()
        let check = finiteDifferenceCheck([("losia_sub", layer.sub), ("input", x)], step: 1e-2, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty && check.worst < 2e-3, "worst \(check.worst)")

        let out = withNoGrad { proj.forward(x.detached()) }
        let w0 = proj.weight.copy()
        try model.merge("a")
        #expect(maxAbsDifference(withNoGrad { proj.forward(x.detached()) }, out) < 1e-5)
        try model.unmerge("a")
        #expect(maxAbsDifference(proj.weight, w0) < 1e-6)

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-losia-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("a", directory: dir)
        let (otherProj, otherModel, _, _) = try #require(Self.toy())
        let loaded = try otherModel.loadAdapter(directory: dir, name: "b")
        try otherModel.setActiveAdapter("b")
        let other = try #require(loaded.layers.first?.adapter as? LoSiALayer)
        #expect(other.located && other.rows == layer.rows && other.columns == layer.columns)
        #expect(maxAbsDifference(withNoGrad { otherProj.forward(x.detached()) }, out) < 1e-6)
    }

    @Test func configErrorsNameTheKey() throws {
        var rng = GraftRNG(seed: 2)
        let root = ModuleList(typeName: "Toy", [("proj", Linear(weight: Tensor.randomNormal([4, 4], rng: &rng), bias: nil))])
        for (json, key) in [(#"{"peft_type":"LOSIA","rank_factor":0,"target_modules":["proj"]}"#, "rank_factor"),
                            (#"{"peft_type":"LOSIA","score_steps":0,"target_modules":["proj"]}"#, "score_steps"),
                            (#"{"peft_type":"LOSIA","score_steps":5,"relocalize_every":5,"target_modules":["proj"]}"#, "relocalize_every")] {
            do {
                try AdaptedModel(root: root).addAdapter("x", config: AdapterConfig(jsonText: json, source: "cfg"))
                Issue.record("accepted \(json)")
            } catch let e as GraftError {
                #expect(e.message.contains(key), "\(e.message)")
            }
        }
    }
}
