import Foundation
import Testing
@testable import GraftAdapters
import GraftTensor
import GraftTestSupport

/// CoPA-Merging's defining math on small hand-checked updates: pruning per task, row coefficients that restore the
/// pruned row mass, and cross-task normalization of entries several tasks keep. Every comparison fails on NaN/Inf.
@Suite struct CoPAMergingTests {
    static func close(_ a: Float, _ b: Float, _ tol: Float = 1e-6) -> Bool { a.isFinite && b.isFinite && abs(a - b) <= tol }

    @Test func hasHandComputedValues() throws {
        // Task 0 keeps 3 of 6: row 0 keeps {4, −3}, row 1 keeps {2}. Task 1 keeps {−5} in row 0, {6, 1} in row 1.
        let d0 = Tensor(shape: [2, 3], values: [4, -3, 1, 0.5, 2, -0.5])
        let d1 = Tensor(shape: [2, 3], values: [0, -5, 0.25, 6, 0.5, 1])
        let (m, c) = try CoPAMerging.merge([d0, d1], weights: [1, 0.5], density: 0.5)
        // Row coefficients: ‖row‖₁ / ‖kept row‖₁.
        #expect(Self.close(c[0][0], 8 / 7) && Self.close(c[0][1], 3 / 2))
        #expect(Self.close(c[1][0], 5.25 / 5) && Self.close(c[1][1], 7.5 / 7))
        // (0,0): only task 0 → 8/7·4. (0,1): both → (8/7·(−3) + 0.5·(5.25/5)·(−5)) / 2. (0,2): pruned by both → 0.
        let only0: Float = 8 / 7 * 4
        #expect(Self.close(m.pointer[0], only0))
        let shared: Float = (8 / 7 * -3 + 0.5 * 1.05 * -5) / 2
        #expect(Self.close(m.pointer[1], shared))
        #expect(m.pointer[2] == 0)
        // Row 1: (1,0) task 1 only, (1,1) task 0 only, (1,2) task 1 only.
        let c1: Float = 7.5 / 7
        #expect(Self.close(m.pointer[3], 0.5 * c1 * 6))
        #expect(Self.close(m.pointer[4], 3))
        #expect(Self.close(m.pointer[5], 0.5 * c1))
    }

    @Test func scaledKeptRowsKeepTheRowMass() throws {
        var rng = GraftRNG(seed: 7)
        let d = Tensor(shape: [5, 16], values: (0..<80).map { _ in rng.nextUniform() * 2 - 1 })
        let (m, c) = try CoPAMerging.merge([d], weights: [1], density: 0.3)
        for j in 0..<5 {
            var full: Float = 0, merged: Float = 0
            for i in 0..<16 { full += abs(d.pointer[j * 16 + i]); merged += abs(m.pointer[j * 16 + i]) }
            #expect(c[0][j] >= 1 && Self.close(full, merged, 1e-4), "row \(j): ‖ΔW‖₁ \(full), merged \(merged)")
        }
    }

    @Test func fullDensityOfOneTaskIsTheWeightedUpdate() throws {
        let d = Tensor(shape: [2, 2], values: [1, -2, 0.5, 3])
        let (m, c) = try CoPAMerging.merge([d], weights: [-0.5], density: 1)
        #expect(c.allSatisfy { $0.allSatisfy { Self.close($0, 1) } })
        for i in 0..<4 { #expect(Self.close(m.pointer[i], -0.5 * d.pointer[i])) }
    }

    @Test func sharedEntriesAreAveragedNotAdded() throws {
        // Two equal tasks: every kept entry is shared, so the merge equals one task's compensated update.
        let d = Tensor(shape: [1, 4], values: [3, -1, 0.5, 2])
        let (two, _) = try CoPAMerging.merge([d, d.copy()], weights: [1, 1], density: 0.5)
        let (one, _) = try CoPAMerging.merge([d], weights: [1], density: 0.5)
        for i in 0..<4 { #expect(Self.close(two.pointer[i], one.pointer[i])) }
    }

    @Test func refusesNonFiniteAndBadArguments() {
        let bad = Tensor(shape: [1, 2], values: [.nan, 1])
        #expect(throws: GraftError.self) { try CoPAMerging.merge([bad], weights: [1], density: 1) }
        let d = Tensor(shape: [1, 2], values: [1, 1])
        #expect(throws: GraftError.self) { try CoPAMerging.merge([d], weights: [1], density: 0) }
        #expect(throws: GraftError.self) { try CoPAMerging.merge([d], weights: [1, 2], density: 0.5) }
        #expect(throws: GraftError.self) { try CoPAMerging.merge([d, Tensor(shape: [2, 1], values: [1, 1])], weights: [1, 1], density: 0.5) }
    }

    @Test func combinesLoRAAdaptersThroughAddWeightedAdapter() throws {
        let (bert, model) = try AdapterCombinationTests.modelWithSources()
        let request = AdapterCombination(adapters: ["a", "b"], weights: [1, 0.5], type: .copa, density: 0.4)
        let report = try model.addWeightedAdapter("copa", combining: request)
        #expect(report.type == .copa && report.rank > 0)
        // The combined adapter's ΔW is the rank-r truncation of CoPA's merged ΔW at each layer.
        let vectors = try ["a", "b"].map { try model.taskVector($0) }
        let combined = try model.taskVector("copa")
        for (k, (path, _, d)) in combined.deltas.enumerated() {
            let sources = vectors.compactMap { v in v.deltas.first { $0.path == path }?.delta }
            let (merged, _) = try CoPAMerging.merge(sources, weights: [1, 0.5], density: 0.4)
            let (_, s, _) = try svd(merged)
            // ‖ΔW_r − M‖²_F = Σ_{i>r} σᵢ² (Eckart–Young).
            var residual = 0.0, tail = 0.0
            for i in 0..<merged.count { residual += pow(Double(d.pointer[i] - merged.pointer[i]), 2) }
            for i in report.rank..<s.count { tail += Double(s.pointer[i] * s.pointer[i]) }
            #expect(residual.isFinite && abs(residual - tail) <= 1e-3 * max(1, tail), "layer \(k) \(path): residual \(residual), tail \(tail)")
        }
        _ = bert
    }
}
