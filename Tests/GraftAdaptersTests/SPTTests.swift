import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// SPT: the global budget goes to the entries of largest accumulated (∂L/∂W)² over the warm-up — recomputed here
/// from the dense gradients gᵀx the test forms itself — a layer whose share passes its threshold switches to LoRA,
/// the others train exactly their entries; gradients in both modes match finite differences, merge reproduces
/// the forward, and save → load keeps the modes and entries.
@Suite struct SPTTests {
    @Test func budgetGoesToTheMostSensitiveEntriesAndCrowdedLayersSwitchToLoRA() throws {
        var rng = GraftRNG(seed: 21)
        let a = Linear(weight: Tensor.randomNormal([6, 8], rng: &rng), bias: nil)
        let b = Linear(weight: Tensor.randomNormal([16, 16], rng: &rng), bias: Tensor.randomNormal([16], rng: &rng))
        let root = ModuleList(typeName: "Toy", [("a", a), ("b", b)])
        let model = AdaptedModel(root: root)
        let json = #"{"peft_type":"SPT","budget_density":0.1,"lora_threshold":0.1,"r":2,"lora_alpha":4,"warmup_steps":2,"target_modules":["a","b"]}"#
        let adapter = try model.addAdapter("s", config: AdapterConfig(jsonText: json, source: "spt"), seed: 5)
        let layers = adapter.layers.compactMap { $0.adapter as? SPTLayer }
        #expect(layers.count == 2 && layers.map(\.capacity) == [4, 25])
        let (xa, xb) = (Tensor.randomNormal([3, 8], rng: &rng), Tensor.randomNormal([3, 16], rng: &rng) * 3)
        let (wa, wb) = (Tensor.randomNormal([3, 6], rng: &rng), Tensor.randomNormal([3, 16], rng: &rng))
        var sensitivity = [[Float](repeating: 0, count: 48), [Float](repeating: 0, count: 256)]
        for step in 1...2 {
            model.setTraining(true)
            (sum(a.forward(xa) * wa * Float(step)) + sum(b.forward(xb) * wb)).backward()
            model.setTraining(false)
            for (l, (w, x)) in [(wa * Float(step), xa), (wb, xb)].enumerated() {
                let g = matmul(w, x, transposeA: true)
                for i in 0..<g.count { sensitivity[l][i] += g.pointer[i] * g.pointer[i] }
            }
            adapter.afterBackward(step: step - 1)
            for hook in adapter.trainingHooks { hook.didUpdate(step: step, totalSteps: 10) }
            #expect(layers.allSatisfy { ($0.mode == .warmingUp) == (step == 1) }, "step \(step): \(layers.map(\.mode))")
        }
        // The expected allocation: the 31 largest scores over both layers.
        let ranked = (sensitivity[0].indices.map { (0, $0) } + sensitivity[1].indices.map { (1, $0) })
            .sorted { sensitivity[$0.0][$0.1] > sensitivity[$1.0][$1.1] }.prefix(31)
        let share = [ranked.filter { $0.0 == 0 }.map(\.1).sorted(), ranked.filter { $0.0 == 1 }.map(\.1).sorted()]
        print("SPT shares: layer a \(share[0].count) (cap 4), layer b \(share[1].count) (cap 25)")
        #expect(share[0].count + share[1].count == 31)
        for (l, layer) in layers.enumerated() {
            if share[l].count > layer.capacity {
                #expect(layer.mode == .lora, "layer \(l): \(share[l].count) entries over capacity \(layer.capacity) but \(layer.mode)")
            } else {
                #expect(layer.mode == .sparse, "layer \(l): \(layer.mode)")
                #expect((0..<layer.rowIndex.count).map { Int(layer.rowIndex[$0]) * layer.inFeatures + Int(layer.colIndex[$0]) } == share[l])
            }
        }
        #expect(Set(layers.map(\.mode)) == [.sparse, .lora], "both modes should occur in this setup: \(layers.map(\.mode))")

        // Gradients in both modes, then merge and a save → load round trip.
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        for (_, p) in adapter.peftStateDict { p.grad = nil }
        func objective() -> Double {
            withNoGrad {
                zip(a.forward(xa).scalars, wa.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
                    + zip(b.forward(xb).scalars, wb.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
            }
        }
        (sum(a.forward(xa) * wa) + sum(b.forward(xb) * wb)).backward()
        // Each layer's live part (the other part is outside the forward and gets no gradient).
        let live = layers.enumerated().flatMap { l, layer in
            layer.mode == .lora ? [("\(l) A", layer.loraA), ("\(l) B", layer.loraB)] : [("\(l) values", layer.values)]
        }
        let check = finiteDifferenceCheck(live, step: 1e-2, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty, "no gradient for \(check.missing)")
        #expect(check.worst < 2e-3, "worst gradient error \(check.worst)")
        let before = objective()
        try model.merge("s")
        #expect(abs(objective() - before) <= 1e-4 * max(1, abs(before)))
        try model.unmerge("s")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-spt-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("s", directory: dir)
        var rng2 = GraftRNG(seed: 21)
        let a2 = Linear(weight: Tensor.randomNormal([6, 8], rng: &rng2), bias: nil)
        let b2 = Linear(weight: Tensor.randomNormal([16, 16], rng: &rng2), bias: Tensor.randomNormal([16], rng: &rng2))
        let loaded = try AdaptedModel(root: ModuleList(typeName: "Toy", [("a", a2), ("b", b2)])).loadAdapter(directory: dir)
        #expect(loaded.layers.compactMap { ($0.adapter as? SPTLayer)?.mode } == layers.map(\.mode))
        #expect(maxAbsDifference(withNoGrad { b2.forward(xb) }, withNoGrad { b.forward(xb) }) <= 1e-5, "b was merged and unmerged (float rounding of W)")
        #expect(maxAbsDifference(withNoGrad { a2.forward(xa) }, withNoGrad { a.forward(xa) }) <= 1e-6)
    }
}
