import GraftModels
import GraftTensor

/// DSEE (Chen et al., 2023, dually sparsity-embedded efficient tuning): a low-rank plus a sparse update,
/// `ΔW = s·B A + S` (`A: [r, in]` Kaiming-uniform, `B: [out, r]` zero, `s = α/r`), and unstructured magnitude
/// pruning of the final weights.
///
/// S is a ``SparseDelta`` of `num_sparse` entries (zero at the start) where the pre-trained W is least explained
/// by a low-rank part: the largest |W − W_r|, `W_r` the rank-`r` truncated SVD of W (the paper decomposes W
/// into low-rank plus sparse with GreBsmo; the truncated SVD is the exact rank-r optimum of that split).
///
/// With `prune_ratio` p > 0, after optimizer step `prune_step` (0: the run's last step) — or when ``prune()`` is
/// called — the `⌊p · out · in⌋` entries of smallest |W + ΔW| are pruned: from then on they contribute nothing
/// (the forward subtracts their `(W + ΔW)` entries, a sparse product over the pruned index array, so later
/// training keeps them at zero), and a merge writes exact zeros there. Choosing them takes one dense pass over
/// W + ΔW at the pruning step. Keys `dsee_A.weight`, `dsee_B.weight`, `dsee_sparse_values` `[N]`,
/// `dsee_sparse_indices` `[2, N]` and, with p > 0, `dsee_pruned_indices` `[2, m]` (all −1 before pruning);
/// indices are int32 (row, column). Graft's own method: PEFT has no DSEE.
public final class DSEELayer: LinearAdapterMethod, AdapterTrainingHook {
    public let state: AdapterState
    /// `[r, in]`.
    public let loraA: Tensor
    /// `[out, r]`.
    public let loraB: Tensor
    /// `α/r`.
    public let scaling: Float
    /// The sparse part S.
    public let sparse: SparseDelta
    /// Fraction of the final weights pruned.
    public let pruneRatio: Double
    /// The optimizer step after which to prune (0: the last).
    public let pruneStep: Int
    /// Entries pruned (`⌊p · out · in⌋`).
    public let prunedCount: Int
    /// Whether the pruning has happened (or was loaded).
    public private(set) var isPruned = false
    /// The pruned positions (row, column), sorted row-major; empty before pruning.
    public private(set) var prunedRows: [Int32] = [], prunedCols: [Int32] = []
    /// W at the pruned positions, and the slot of S at each one (−1 where S has no entry).
    private var prunedBase: Tensor?
    private var prunedSlots: [Int32] = []
    private weak var base: Linear?

    /// Creates the layer; throws naming `path` for a sparse count or pruning ratio the layer cannot take.
    public init(base: Linear, rank: Int, alpha: Float, numSparse: Int, pruneRatio: Double, pruneStep: Int,
                state: AdapterState, path: String) throws {
        let total = base.outFeatures * base.inFeatures
        guard numSparse >= 1, numSparse <= total else {
            throw GraftError.invalid("\(path): DSEE 'num_sparse' \(numSparse) is outside 1...\(total) (the layer's entries)")
        }
        prunedCount = Int(pruneRatio * Double(total))
        guard pruneRatio == 0 || prunedCount >= 1 else {
            throw GraftError.invalid("\(path): DSEE 'prune_ratio' \(pruneRatio) prunes no entry of a \(base.outFeatures)×\(base.inFeatures) layer")
        }
        self.state = state
        self.base = base
        self.pruneRatio = pruneRatio
        self.pruneStep = pruneStep
        scaling = alpha / Float(rank)
        loraA = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
        loraB = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        let w = base.weight
        let residual = w.copy()
        if rank < min(base.outFeatures, base.inFeatures) {
            let (u, s, vt) = try svd(w, what: "\(path) weight")
            let k = min(rank, s.count), width = u.shape[1], inF = base.inFeatures
            // U_k Σ_k (the first k columns of U, scaled) times the first k rows of Vᵀ.
            let us = Tensor(zeros: [base.outFeatures, k]), vk = Tensor(zeros: [k, inF])
            for i in 0..<base.outFeatures { for t in 0..<k { us.pointer[i * k + t] = u.pointer[i * width + t] * s.pointer[t] } }
            vk.pointer.update(from: vt.pointer, count: k * inF)
            residual.addInPlace(matmul(us, vk) * -1)
        } else {
            residual.pointer.update(repeating: 0, count: total)
        }
        for i in 0..<total { residual.pointer[i] = abs(residual.pointer[i]) }
        let top = topIndices(UnsafeBufferPointer(start: residual.pointer, count: total), count: numSparse)
        sparse = SparseDelta(rows: base.outFeatures, cols: base.inFeatures, positions: top)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("dsee_A.weight", loraA), ("dsee_B.weight", loraB), ("dsee_sparse_values", sparse.values)]
    }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        var buffers = [sparse.indexBuffer("dsee_sparse_indices")]
        if prunedCount > 0 {
            buffers.append(("dsee_pruned_indices", isPruned ? prunedRows + prunedCols : [Int32](repeating: -1, count: 2 * prunedCount), [2, prunedCount]))
        }
        return buffers
    }

    public func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws {
        switch name {
        case "dsee_sparse_indices":
            try sparse.loadIndices(name, values: values, shape: shape)
        case "dsee_pruned_indices" where prunedCount > 0:
            if shape == [2, prunedCount], values.count == 2 * prunedCount, values.allSatisfy({ $0 == -1 }) {
                isPruned = false
                prunedRows = []
                prunedCols = []
            } else {
                (prunedRows, prunedCols) = try SparseDelta.validatedIndices(name, values, shape: shape, count: prunedCount,
                                                                            rows: sparse.rows, cols: sparse.cols)
                isPruned = true
            }
        default:
            throw GraftError.format("unexpected DSEE integer tensor '\(name)'\(prunedCount == 0 ? " (this adapter has prune_ratio 0)" : "")")
        }
        prunedBase = nil  // recomputed from the current indices on next use
    }

    /// W at the pruned positions and S's slot at each (computed once per set of indices).
    private func prunedConstants() -> (Tensor, [Int32]) {
        if let prunedBase { return (prunedBase, prunedSlots) }
        let cols = sparse.cols
        let w = base?.weight ?? Tensor(zeros: [sparse.rows, cols])
        let values = Tensor(zeros: [prunedRows.count])
        for k in 0..<prunedRows.count { values.pointer[k] = w.pointer[Int(prunedRows[k]) * cols + Int(prunedCols[k])] }
        var slotOf: [Int: Int32] = [:]
        for (slot, p) in sparse.positions.enumerated() { slotOf[p] = Int32(slot) }
        prunedSlots = (0..<prunedRows.count).map { slotOf[Int(prunedRows[$0]) * cols + Int(prunedCols[$0])] ?? -1 }
        prunedBase = values
        return (values, prunedSlots)
    }

    /// (W + ΔW) at the pruned positions, recorded (gradients reach A, B and S through the gathers).
    private func prunedFinalValues() -> Tensor {
        let (w, slots) = prunedConstants()
        let low = gatherProduct(loraB, loraA, rows: prunedRows, cols: prunedCols)
        return w + low * scaling + gatherSlots(sparse.values, slots: slots)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(x, loraA)
        var out = y + linear(h, loraB) * scaling + sparse.apply(x)
        if isPruned {
            out = out - sparseLinear(x, values: prunedFinalValues(), rowIndex: prunedRows, colIndex: prunedCols, outFeatures: sparse.rows)
        }
        return out
    }

    /// `s·B A + S`, and after pruning `−W` at the pruned entries, so a merge leaves exact zeros there.
    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let d = matmul(loraB, loraA) * scaling
            sparse.scatter(into: d)
            if isPruned {
                let w = base.weight, cols = sparse.cols
                for k in 0..<prunedRows.count {
                    let i = Int(prunedRows[k]) * cols + Int(prunedCols[k])
                    d.pointer[i] = -w.pointer[i]
                }
            }
            return d
        }
    }

    /// After step `prune_step` (or the run's last step when it is 0), prune once.
    public func didUpdate(step: Int, totalSteps: Int) {
        guard prunedCount > 0, !isPruned, step == (pruneStep == 0 ? totalSteps : pruneStep) else { return }
        prune()
    }

    /// Prunes the `⌊p · out · in⌋` entries of smallest |W + ΔW| (ties to the lower index; NaN counts as largest).
    public func prune() {
        guard prunedCount > 0, !isPruned, let base else { return }
        let final = withNoGrad { base.weight + matmul(loraB, loraA) * scaling }
        sparse.scatter(into: final)
        let total = final.count
        for i in 0..<total { final.pointer[i] = final.pointer[i].isNaN ? -.infinity : -abs(final.pointer[i]) }
        let chosen = topIndices(UnsafeBufferPointer(start: final.pointer, count: total), count: prunedCount)
        prunedRows = chosen.map { Int32($0 / sparse.cols) }
        prunedCols = chosen.map { Int32($0 % sparse.cols) }
        isPruned = true
        prunedBase = nil
    }
}

/// `(B A)[rows[k], cols[k]]` for each k (`B: [out, r]`, `A: [r, in]`), recorded; never forms B A.
func gatherProduct(_ b: Tensor, _ a: Tensor, rows: [Int32], cols: [Int32]) -> Tensor {
    let r = a.shape[0], inF = a.shape[1], m = rows.count
    let out = Tensor(zeros: [m])
    let pb = b.pointer, pa = a.pointer, po = out.pointer
    for k in 0..<m {
        let bi = pb + Int(rows[k]) * r, j = Int(cols[k])
        var acc: Float = 0
        for t in 0..<r { acc += bi[t] * pa[t * inF + j] }
        po[k] = acc
    }
    return Tensor.result(out, inputs: [b, a]) { g in
        let db = Tensor(zeros: b.shape), da = Tensor(zeros: a.shape)
        let pg = g.pointer, pdb = db.pointer, pda = da.pointer, pb = b.pointer, pa = a.pointer
        for k in 0..<m {
            let i = Int(rows[k]) * r, j = Int(cols[k])
            for t in 0..<r {
                pdb[i + t] += pg[k] * pa[t * inF + j]
                pda[t * inF + j] += pg[k] * pb[i + t]
            }
        }
        return [b.requiresGrad ? db : nil, a.requiresGrad ? da : nil]
    }
}

/// `values[slots[k]]` (0 where the slot is −1), recorded.
func gatherSlots(_ values: Tensor, slots: [Int32]) -> Tensor {
    let out = Tensor(zeros: [slots.count])
    for (k, s) in slots.enumerated() where s >= 0 { out.pointer[k] = values.pointer[Int(s)] }
    return Tensor.result(out, inputs: [values]) { g in
        let d = Tensor(zeros: values.shape)
        for (k, s) in slots.enumerated() where s >= 0 { d.pointer[Int(s)] += g.pointer[k] }
        return [d]
    }
}

/// DSEE (`peft_type: "DSEE"`, no PEFT counterpart): `r`, `lora_alpha`, `num_sparse` (entries of S per layer,
/// default 64), `prune_ratio` (fraction of the final weights pruned, in [0, 1), default 0), `prune_step`
/// (optimizer step after which to prune, default 0 = the last).
public enum DSEEFactory: AdapterMethodFactory {
    public static let peftType = "DSEE"
    public static let family = "weight-delta (low rank + sparse, pruned)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 8, "lora_alpha": 16, "num_sparse": 64, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let n = try config.int("num_sparse", default: 64)
        guard n >= 1 else { throw GraftError.invalid("\(config.source): 'num_sparse' must be ≥ 1, got \(n)") }
        let p = try config.double("prune_ratio", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'prune_ratio' must be in [0, 1), got \(p)") }
        let step = try config.int("prune_step", default: 0)
        guard step >= 0 else { throw GraftError.invalid("\(config.source): 'prune_step' must be ≥ 0, got \(step)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "lora_alpha")
        return try DSEELayer(base: layer, rank: r, alpha: alpha, numSparse: try config.int("num_sparse", default: 64),
                             pruneRatio: try config.double("prune_ratio", default: 0),
                             pruneStep: try config.int("prune_step", default: 0), state: state, path: "\(config.source): \(path)")
    }
}
