import Foundation
import Testing
@testable import GraftAdapters
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// What defines each selective / sparse method: BitFit trains biases only, NeuroAda's bypasses are exactly the
/// top-k |W| inputs of every neuron, SpIEL's drop/regrow keeps the entry count at its budget.
@Suite struct SparseInvariantTests {
    static func toy(_ rows: Int, _ cols: Int, bias: Bool, seed: UInt64) -> (ModuleList, Linear) {
        var rng = GraftRNG(seed: seed)
        let proj = Linear(weight: Tensor.randomNormal([rows, cols], rng: &rng), bias: bias ? Tensor.randomNormal([rows], rng: &rng) : nil)
        return (ModuleList(typeName: "Toy", [("proj", proj)]), proj)
    }

    /// BitFit: one trainable value per output of each targeted layer; its output is the base layer's with bias
    /// b + δb (the weights are never touched); a bias-free layer trains a new bias unless `add_missing_bias` is
    /// false, and refuses to merge (nothing to merge into).
    @Test func bitFitTrainsOnlyBiases() throws {
        let bert = try Assets.loadMiniLM()
        let adapter = try AdaptedModel(root: bert).addAdapter("b", config: AdapterConfig(jsonText: #"{"peft_type":"BITFIT","target_modules":["query","value","intermediate.dense"]}"#, source: "bitfit"))
        #expect(adapter.parameterCount == 6 * (384 + 384 + 1536))

        for bias in [true, false] {
            let (root, proj) = Self.toy(5, 4, bias: bias, seed: 1)
            let weight = proj.weight.copy()
            let model = AdaptedModel(root: root)
            let a = try model.addAdapter("b", config: AdapterConfig(jsonText: #"{"peft_type":"BITFIT","target_modules":["proj"]}"#, source: "bitfit"))
            guard let layer = a.layers.first?.adapter as? BitFitLayer else { Issue.record("not BitFit"); return }
            var rng = GraftRNG(seed: 2)
            for i in 0..<5 { layer.bias.pointer[i] = rng.nextNormal() }
            let x = Tensor.randomNormal([3, 4], rng: &rng)
            let out = withNoGrad { proj.forward(x) }
            let b = proj.bias.map { $0 + layer.bias } ?? layer.bias
            let expected = withNoGrad { linear(x, weight, b) }
            #expect(maxAbsDifference(out, expected) <= 1e-6, "bias \(bias)")
            #expect(proj.weight.scalars == weight.scalars)
            if bias {
                try model.merge("b")
                #expect(proj.weight.scalars == weight.scalars, "a BitFit merge changed W")
                #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, expected) <= 1e-6)
                try model.unmerge("b")
            } else {
                #expect(throws: GraftError.self) { try model.merge("b") }
                #expect(throws: GraftError.self) {
                    try AdaptedModel(root: Self.toy(5, 4, bias: false, seed: 1).0).addAdapter("c", config: AdapterConfig(jsonText: #"{"peft_type":"BITFIT","add_missing_bias":false,"target_modules":["proj"]}"#, source: "bitfit"))
                }
            }
        }
    }

    /// NeuroAda: every row holds exactly k entries, and each chosen |W| is at least every unchosen |W| of its row
    /// (ties in |W| go to the lower column), checked by brute force over the rows.
    @Test func neuroAdaPicksTheTopKMagnitudesOfEveryRow() throws {
        let (root, proj) = Self.toy(12, 20, bias: false, seed: 4)
        // Ties: row 0 holds equal magnitudes of both signs.
        for j in 0..<20 { proj.weight.pointer[j] = j % 2 == 0 ? 1 : -1 }
        let k = 5
        let adapter = try AdaptedModel(root: root).addAdapter("n", config: AdapterConfig(jsonText: #"{"peft_type":"NEUROADA","k":5,"target_modules":["proj"]}"#, source: "neuroada"))
        guard let layer = adapter.layers.first?.adapter as? NeuroAdaLayer else { Issue.record("not NeuroAda"); return }
        #expect(adapter.parameterCount == 12 * k)
        let w = proj.weight.scalars
        for row in 0..<12 {
            let chosen = (0..<layer.delta.count).filter { Int(layer.delta.rowIndex[$0]) == row }.map { Int(layer.delta.colIndex[$0]) }
            #expect(chosen.count == k, "row \(row): \(chosen.count) entries")
            let others = Set(0..<20).subtracting(chosen)
            for c in chosen {
                for o in others {
                    let (mc, mo) = (abs(w[row * 20 + c]), abs(w[row * 20 + o]))
                    #expect(mc > mo || (mc == mo && c < o), "row \(row): chose column \(c) (|w| \(mc)) over \(o) (|w| \(mo))")
                }
            }
        }
        #expect((0..<layer.delta.count).filter { layer.delta.rowIndex[$0] == 0 }.map { layer.delta.colIndex[$0] } == [0, 1, 2, 3, 4])
        #expect(throws: GraftError.self) {
            try AdaptedModel(root: Self.toy(3, 4, bias: false, seed: 1).0).addAdapter("x", config: AdapterConfig(jsonText: #"{"peft_type":"NEUROADA","k":5,"target_modules":["proj"]}"#, source: "neuroada"))
        }
    }

    /// SpIEL: through the training hook, rounds every `update_interval` steps drop the smallest |δ| and regrow at
    /// the candidates with the largest accumulated gradient (compared with the dense ∂L/∂W = Σ gᵀ x the test forms
    /// itself); the entry count stays exactly at the budget, positions stay distinct and in range.
    @Test func spielKeepsItsBudgetThroughDropAndRegrow() throws {
        let (root, proj) = Self.toy(16, 16, bias: true, seed: 6)
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("s", config: AdapterConfig(jsonText: #"{"peft_type":"SPIEL","density":0.125,"update_interval":2,"drop_fraction":0.25,"candidate_ratio":2,"target_modules":["proj"]}"#, source: "spiel"), seed: 9)
        guard let layer = adapter.layers.first?.adapter as? SpIELLayer else { Issue.record("not SpIEL"); return }
        let budget = 32
        #expect(layer.delta.count == budget && adapter.parameterCount == budget)
        var rng = GraftRNG(seed: 8)
        let initial = Set(layer.delta.positions)
        var denseGrad = [Float](repeating: 0, count: 256)
        for step in 1...6 {
            let x = Tensor.randomNormal([4, 16], rng: &rng)
            let g = Tensor.randomNormal([4, 16], rng: &rng)
            let candidatesBefore = layer.candidates?.positions ?? []
            model.setTraining(true)
            sum(proj.forward(x) * g).backward()
            model.setTraining(false)
            let dw = matmul(g, x, transposeA: true)
            for i in 0..<256 { denseGrad[i] += dw.pointer[i] }
            adapter.afterBackward(step: step - 1)
            // The accumulated candidate gradients are the dense gradient's entries.
            for (i, p) in candidatesBefore.enumerated() {
                #expect(abs(layer.accumulated[i] - denseGrad[p]) <= 1e-4 * max(1, abs(denseGrad[p])), "candidate \(p)")
            }
            // An SGD step on the values.
            if let grad = layer.delta.values.grad {
                for i in 0..<budget { layer.delta.values.pointer[i] -= 0.1 * grad.pointer[i] }
            }
            layer.delta.values.grad = nil
            let values = layer.delta.values.scalars, positions = layer.delta.positions
            let scores = Dictionary(uniqueKeysWithValues: zip(candidatesBefore, layer.accumulated.map(abs)))
            for hook in adapter.trainingHooks { hook.didUpdate(step: step, totalSteps: 100) }
            let after = layer.delta.positions
            #expect(after.count == budget && Set(after).count == budget, "step \(step): budget \(after.count), distinct \(Set(after).count)")
            #expect(after.allSatisfy { $0 >= 0 && $0 < 256 })
            if step % 2 == 0 {
                denseGrad = [Float](repeating: 0, count: 256)
                let moved = (0..<budget).filter { after[$0] != positions[$0] }
                #expect(moved.count == 8, "step \(step): \(moved.count) entries moved")
                // The dropped were the 8 smallest |δ|, the grown the 8 best-scored candidates, now at 0.
                let keptMagnitudes = (0..<budget).filter { !moved.contains($0) }.map { abs(values[$0]) }
                #expect(moved.allSatisfy { s in keptMagnitudes.allSatisfy { abs(values[s]) <= $0 } })
                let grownScores = moved.compactMap { scores[after[$0]] }
                #expect(grownScores.count == 8, "regrown outside the candidates")
                let rest = Set(candidatesBefore).subtracting(moved.map { after[$0] }).compactMap { scores[$0] }
                #expect(grownScores.allSatisfy { g in rest.allSatisfy { g >= $0 } })
                #expect(moved.allSatisfy { layer.delta.values.pointer[$0] == 0 })
            } else {
                #expect(after == positions, "step \(step): moved between rounds")
            }
        }
        #expect(layer.rounds == 3)
        #expect(Set(layer.delta.positions) != initial)
    }

    /// DSEE: S sits on the largest |W − W_r| (rank-r truncated SVD residual, checked by brute force); pruning
    /// after `prune_step` removes exactly ⌊p · out · in⌋ entries, the smallest |W + ΔW|; a merge writes exact
    /// zeros there and reproduces the pruned forward, unmerge restores W, and training after pruning keeps them 0.
    @Test func dseePrunesTheFinalWeightsToItsRatio() throws {
        let (root, proj) = Self.toy(12, 10, bias: true, seed: 3)
        let weight = proj.weight.copy()
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("d", config: AdapterConfig(jsonText: #"{"peft_type":"DSEE","r":2,"lora_alpha":4,"num_sparse":6,"prune_ratio":0.3,"prune_step":2,"target_modules":["proj"]}"#, source: "dsee"))
        guard let layer = adapter.layers.first?.adapter as? DSEELayer else { Issue.record("not DSEE"); return }
        #expect(adapter.parameterCount == 2 * 10 + 12 * 2 + 6)
        let (u, sv, vt) = try svd(weight, what: "test")
        var residual = [Float](repeating: 0, count: 120)
        for i in 0..<12 {
            for j in 0..<10 {
                var low: Float = 0
                for t in 0..<2 { low += u.pointer[i * u.shape[1] + t] * sv.pointer[t] * vt.pointer[t * 10 + j] }
                residual[i * 10 + j] = abs(weight.pointer[i * 10 + j] - low)
            }
        }
        let chosen = Set(layer.sparse.positions)
        #expect(chosen.count == 6)
        for c in chosen { for o in Set(0..<120).subtracting(chosen) { #expect(residual[c] >= residual[o] - 1e-5, "S at \(c) over \(o)") } }

        var rng = GraftRNG(seed: 4)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        let final = withNoGrad { weight + (layer.deltaWeight(base: proj) ?? weight) }
        for hook in adapter.trainingHooks { hook.didUpdate(step: 1, totalSteps: 10) }
        #expect(!layer.isPruned)
        for hook in adapter.trainingHooks { hook.didUpdate(step: 2, totalSteps: 10) }
        #expect(layer.isPruned && layer.prunedRows.count == 36)
        let pruned = Set((0..<layer.prunedRows.count).map { Int(layer.prunedRows[$0]) * 10 + Int(layer.prunedCols[$0]) })
        #expect(pruned.count == 36)
        let kept = Set(0..<120).subtracting(pruned)
        #expect(pruned.allSatisfy { p in kept.allSatisfy { abs(final.pointer[p]) <= abs(final.pointer[$0]) } }, "pruned a larger |W + ΔW|")

        for round in 0..<2 {
            let x = Tensor.randomNormal([3, 10], rng: &rng)
            let unmerged = withNoGrad { proj.forward(x) }
            try model.merge("d")
            #expect(pruned.allSatisfy { proj.weight.pointer[$0] == 0 }, "round \(round): a pruned weight is not 0")
            #expect((0..<120).filter { proj.weight.pointer[$0] == 0 }.count == 36)
            #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, unmerged) <= 1e-5)
            try model.unmerge("d")
            #expect(maxAbsDifference(proj.weight, weight) <= 1e-6)
            // A gradient step after pruning: the pruned entries stay out of the forward.
            sum(proj.forward(x) * Tensor.randomNormal([3, 12], rng: &rng)).backward()
            for (_, p) in adapter.peftStateDict {
                if let g = p.grad { for i in 0..<p.count { p.pointer[i] -= 0.1 * g.pointer[i] } }
                p.grad = nil
            }
        }
    }

    /// ID³: after step t exactly min(n, ⌈n·t/T⌉) entries are unmasked (n = 30, T = 4: 8, 15, 23, 30, 30), each
    /// step's new ones are the masked positions of highest |∂L/∂W| / (|W| + ε) on that step's dense gradient (which
    /// the test forms itself), and the masked values never move.
    @Test func id3UnmasksOnScheduleByImportance() throws {
        let (root, proj) = Self.toy(10, 12, bias: true, seed: 12)
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("i", config: AdapterConfig(jsonText: #"{"peft_type":"ID3","density":0.25,"unmask_steps":4,"target_modules":["proj"]}"#, source: "id3"))
        guard let layer = adapter.layers.first?.adapter as? ID3Layer else { Issue.record("not ID3"); return }
        #expect(layer.budget == 30 && layer.unmaskedCount == 0)
        var rng = GraftRNG(seed: 13)
        let expectedCounts = [8, 15, 23, 30, 30]
        for step in 1...5 {
            let x = Tensor.randomNormal([4, 12], rng: &rng), g = Tensor.randomNormal([4, 10], rng: &rng)
            model.setTraining(true)
            sum(proj.forward(x) * g).backward()
            model.setTraining(false)
            adapter.afterBackward(step: step - 1)
            let dense = matmul(g, x, transposeA: true)
            let before = Set((0..<layer.unmaskedCount).map { Int(layer.rowIndex[$0]) * 12 + Int(layer.colIndex[$0]) })
            if let grad = layer.values.grad {
                #expect(grad.scalars.dropFirst(layer.unmaskedCount).allSatisfy { $0 == 0 }, "a masked entry got a gradient")
                for i in 0..<layer.budget { layer.values.pointer[i] -= 0.1 * grad.pointer[i] }
            }
            layer.values.grad = nil
            for hook in adapter.trainingHooks { hook.didUpdate(step: step, totalSteps: 5) }
            #expect(layer.unmaskedCount == expectedCounts[step - 1], "step \(step): \(layer.unmaskedCount) unmasked")
            let all = (0..<layer.unmaskedCount).map { Int(layer.rowIndex[$0]) * 12 + Int(layer.colIndex[$0]) }
            #expect(Set(all).count == all.count, "step \(step): a position unmasked twice")
            let new = Set(all).subtracting(before)
            func importance(_ p: Int) -> Float { abs(dense.pointer[p]) / (abs(proj.weight.pointer[p]) + 1e-8) }
            let stillMasked = Set(0..<120).subtracting(all)
            for p in new { for q in stillMasked { #expect(importance(p) >= importance(q) * (1 - 1e-5), "step \(step): unmasked \(p) before \(q)") } }
            #expect(layer.values.scalars.dropFirst(layer.unmaskedCount).allSatisfy { $0 == 0 })
        }
    }
}
