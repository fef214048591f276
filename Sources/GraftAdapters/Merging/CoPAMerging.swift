import GraftTensor

/// CoPA-Merging (Zeng et al., 2025, "Parameter Efficient Merging for Multimodal Large Language Models with
/// Complementary Parameter Adaptation"): a training-free merge of low-rank task updates `ΔWₜ = sₜ·Bₜ Aₜ`
/// (each `rows × cols`) in three steps.
///
/// 1. **Pruning.** Each task keeps the `k = ⌊density·n⌋` entries of largest magnitude of its own `ΔWₜ`
///    (mask `Mₜ`; ties keep the earliest entries), so what survives keeps the task's dominant directions.
/// 2. **Complementary scaling from parameter relations.** Pruning shrinks the update (and its singular values);
///    each output row `j` of each task gets the coefficient
///    `cₜⱼ = ‖ΔWₜ[j,:]‖₁ / ‖(Mₜ ⊙ ΔWₜ)[j,:]‖₁` (the relation between the row's full and kept mass), so the
///    scaled kept row `cₜⱼ·(Mₜ ⊙ ΔWₜ)[j,:]` has the original row's L1 mass again — the gap pruning opened is
///    compensated without changing the kept entries' direction (0 for a row with nothing kept).
/// 3. **Cross-task normalization.** Each merged entry is the weighted sum of the scaled kept entries divided by
///    the number of tasks that kept it: `ΔW[j,i] = Σₜ wₜ cₜⱼ Mₜ[j,i] ΔWₜ[j,i] / max(1, Σₜ Mₜ[j,i])`, so entries
///    only one task uses (complementary positions) keep that task's full value and shared entries are averaged
///    rather than added, which keeps the merged update's scale independent of the number of tasks.
///
/// Graft's reading of the paper's three steps as its abstract and `METHODS.md` state them (the reference code was
/// not available to check per-equation details such as the norm used by the coefficients); the result is refactored to
/// LoRA factors by a truncated SVD like PEFT's `*_svd` combination types (``CombinationType/copa``).
public enum CoPAMerging {
    /// The merged update of `deltas` (equal shapes `[rows, cols]`, row-major) with one weight per task, keeping a
    /// fraction `density` in (0, 1] of each task's entries. Returns the merged tensor and each task's row
    /// coefficients `cₜⱼ` (`[task][row]`).
    public static func merge(_ deltas: [Tensor], weights: [Float], density: Double) throws -> (merged: Tensor, coefficients: [[Float]]) {
        guard let first = deltas.first, deltas.count == weights.count else {
            throw GraftError.invalid("CoPA-Merging: \(deltas.count) task updates and \(weights.count) weights; give one weight per update (at least one)")
        }
        guard density > 0, density <= 1 else { throw GraftError.invalid("CoPA-Merging: density must be in (0, 1], got \(density)") }
        guard first.shape.count == 2 else { throw GraftError.invalid("CoPA-Merging: task updates must be matrices, got shape \(first.shape)") }
        let rows = first.shape[0], cols = first.shape[1], n = rows * cols
        for (t, d) in deltas.enumerated() where d.shape != first.shape {
            throw GraftError.invalid("CoPA-Merging: task update \(t) has shape \(d.shape), task 0 has \(first.shape)")
        }
        for (t, d) in deltas.enumerated() {
            if let bad = (0..<n).first(where: { !d.pointer[$0].isFinite }) {
                throw GraftError.invalid("CoPA-Merging: task update \(t) entry \(bad) is \(d.pointer[bad])")
            }
        }
        if let bad = weights.firstIndex(where: { !$0.isFinite }) { throw GraftError.invalid("CoPA-Merging: weight \(bad) is \(weights[bad])") }
        let merged = Tensor(zeros: first.shape)
        let counts = Tensor(zeros: first.shape)
        let count = counts.pointer
        var coefficients: [[Float]] = []
        let out = merged.pointer
        for (t, delta) in deltas.enumerated() {
            let kept = withNoGrad { delta.copy() }
            TaskVectorMerge.keepLargest(kept.pointer, count: n, k: Int(density * Double(n)))
            let full = delta.pointer, p = kept.pointer
            var rowCoefficients = [Float](repeating: 0, count: rows)
            for j in 0..<rows {
                var fullMass = 0.0, keptMass = 0.0
                for i in 0..<cols {
                    fullMass += Double(abs(full[j * cols + i]))
                    keptMass += Double(abs(p[j * cols + i]))
                }
                let c = keptMass > 0 ? Float(fullMass / keptMass) : 0
                guard c.isFinite else {
                    throw GraftError.invalid("CoPA-Merging: task update \(t) row \(j) gives a non-finite coefficient (the update holds NaN or Inf)")
                }
                rowCoefficients[j] = c
                let scale = weights[t] * c
                for i in 0..<cols where p[j * cols + i] != 0 {
                    out[j * cols + i] += scale * p[j * cols + i]
                    count[j * cols + i] += 1
                }
            }
            coefficients.append(rowCoefficients)
        }
        for i in 0..<n where count[i] > 1 { out[i] /= count[i] }
        return withExtendedLifetime(counts) { (merged, coefficients) }
    }
}
