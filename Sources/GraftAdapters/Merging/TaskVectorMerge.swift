import GraftTensor

/// How TIES elects each entry's sign across the task tensors (PEFT's `majority_sign_method`).
public enum MajoritySignMethod: String, Sendable, CaseIterable {
    /// The sign of the entries' sum (PEFT's default, `"total"`).
    case total
    /// The sign held by more tensors (`"frequency"`); a tie elects +.
    case frequency

    /// Parses PEFT's name; the error names the field and the accepted values.
    public init(peftName: String) throws {
        guard let m = MajoritySignMethod(rawValue: peftName) else {
            throw GraftError.invalid("majority_sign_method '\(peftName)' is not one of: total, frequency")
        }
        self = m
    }
}

/// Which entries of each task tensor survive before the tensors are combined (PEFT's `prune`).
enum Sparsification: Sendable {
    /// Every entry is kept.
    case none
    /// The `⌊density·n⌋` entries of largest magnitude are kept, the rest zeroed (PEFT's `magnitude_based_pruning`).
    case magnitude
    /// Each entry is kept with probability `density` and the survivors divided by `density` (DARE;
    /// PEFT's `random_pruning` with `rescale=True`).
    case random
}

/// One of PEFT's task-vector merges of equally shaped tensors (`task_arithmetic`, `magnitude_prune`, `ties`,
/// `dare_linear`, `dare_ties` in `peft/utils/merge_utils.py`): sparsify each tensor, then either sum the weighted
/// tensors or, for TIES, elect a sign per entry and average the weighted entries that agree with it.
struct TaskVectorMerge: Sendable {
    /// What each task tensor loses first.
    var sparsification: Sparsification
    /// Sign election + disjoint mean (TIES) instead of a weighted sum.
    var electSign: Bool
    /// The fraction of entries kept (ignored without sparsification). At or above 1 nothing is pruned, as in PEFT.
    var density: Double
    /// How TIES elects the sign.
    var signMethod: MajoritySignMethod

    /// Entries kept and entries seen by random pruning so far (DARE's statistics).
    private(set) var keptEntries = 0
    /// Entries the random pruning drew a keep/drop for.
    private(set) var drawnEntries = 0

    init(sparsification: Sparsification, electSign: Bool, density: Double, signMethod: MajoritySignMethod) {
        self.sparsification = sparsification
        self.electSign = electSign
        self.density = density
        self.signMethod = signMethod
    }

    /// Merges `tensors` (equal shapes) with one weight each. Random pruning draws from `rng`, tensor by tensor in
    /// order, entry by entry, so a seed fixes the result.
    mutating func merge(_ tensors: [Tensor], weights: [Float], rng: inout GraftRNG) -> Tensor {
        let shape = tensors[0].shape, n = tensors[0].count
        let pruned = tensors.map { t -> Tensor in
            let c = t.copy()
            sparsify(c.pointer, count: n, rng: &rng)
            return c
        }
        let out = Tensor(zeros: shape)
        let o = out.pointer
        if !electSign {
            // task_arithmetic: Σ_t w_t · τ_t, summed in task order.
            for (t, w) in zip(pruned, weights) {
                let p = t.pointer
                for i in 0..<n { o[i] += p[i] * w }
            }
            return out
        }
        // TIES: the elected sign is that of Σ τ_t ("total") or Σ sign(τ_t) ("frequency"), + on a tie; the entry is
        // the mean of the weighted entries whose sign equals it (zeros never count), 0 when none does.
        let count = Tensor(zeros: shape)
        let votes = Tensor(zeros: shape)
        let v = votes.pointer, c = count.pointer
        for t in pruned {
            let p = t.pointer
            switch signMethod {
            case .total: for i in 0..<n { v[i] += p[i] }
            case .frequency: for i in 0..<n { v[i] += p[i] > 0 ? 1 : (p[i] < 0 ? -1 : 0) }
            }
        }
        for (t, w) in zip(pruned, weights) {
            let p = t.pointer
            for i in 0..<n {
                let agrees = v[i] >= 0 ? p[i] > 0 : p[i] < 0
                if agrees {
                    o[i] += p[i] * w
                    c[i] += 1
                }
            }
        }
        for i in 0..<n { o[i] /= max(c[i], 1) }
        return out
    }

    /// Prunes one tensor in place.
    private mutating func sparsify(_ p: UnsafeMutablePointer<Float>, count n: Int, rng: inout GraftRNG) {
        guard density < 1 else { return }
        switch sparsification {
        case .none: return
        case .magnitude: Self.keepLargest(p, count: n, k: Int(density * Double(n)))
        case .random:
            // torch.bernoulli(density) then / density; the uniform draw is Graft's (PyTorch's stream is not reproducible).
            let d = Float(density)
            var kept = 0
            for i in 0..<n {
                if rng.nextUniform() < d {
                    p[i] = p[i] / d
                    kept += 1
                } else {
                    p[i] = 0
                }
            }
            keptEntries += kept
            drawnEntries += n
        }
    }

    /// Zeroes all but the `k` entries of largest magnitude (ties at the threshold keep the earliest entries).
    static func keepLargest(_ p: UnsafeMutablePointer<Float>, count n: Int, k: Int) {
        guard k < n else { return }
        guard k > 0 else {
            p.update(repeating: 0, count: n)
            return
        }
        var magnitudes = [Float](unsafeUninitializedCapacity: n) { buf, initialized in
            for i in 0..<n { buf[i] = abs(p[i]) }
            initialized = n
        }
        // The k-th largest magnitude is the threshold: strictly larger entries stay, then equal ones up to k.
        magnitudes.sort(by: >)
        let threshold = magnitudes[k - 1]
        var strictlyLarger = 0
        for i in 0..<n where abs(p[i]) > threshold { strictlyLarger += 1 }
        var equalAllowed = k - strictlyLarger
        for i in 0..<n {
            let m = abs(p[i])
            if m > threshold { continue }
            if m == threshold && equalAllowed > 0 {
                equalAllowed -= 1
                continue
            }
            p[i] = 0
        }
    }
}
