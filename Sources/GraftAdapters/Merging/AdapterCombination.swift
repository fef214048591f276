import GraftTensor

/// PEFT's `combination_type` for `add_weighted_adapter`: how LoRA adapters become one.
public enum CombinationType: String, Sendable, CaseIterable {
    /// Weighted sum of the ΔWs, re-factored by a truncated SVD (PEFT's default).
    case svd
    /// Weighted sum of the A's and of the B's (each with √(weight·scaling)); equal ranks required.
    case linear
    /// A's (times weight·scaling) and B's stacked along the rank: exact, rank = Σ ranks.
    case cat
    /// TIES (trim by magnitude, elect sign, disjoint mean) on the A's and on the B's; equal ranks required.
    case ties
    /// TIES on the ΔWs, then a truncated SVD.
    case tiesSVD = "ties_svd"
    /// DARE (random drop + rescale) then a weighted sum, on the A's and the B's; equal ranks required.
    case dareLinear = "dare_linear"
    /// DARE then TIES's sign election, on the A's and the B's; equal ranks required.
    case dareTies = "dare_ties"
    /// DARE then a weighted sum of the ΔWs, then a truncated SVD.
    case dareLinearSVD = "dare_linear_svd"
    /// DARE then TIES on the ΔWs, then a truncated SVD.
    case dareTiesSVD = "dare_ties_svd"
    /// Magnitude pruning then a weighted sum, on the A's and the B's; equal ranks required.
    case magnitudePrune = "magnitude_prune"
    /// Magnitude pruning then a weighted sum of the ΔWs, then a truncated SVD.
    case magnitudePruneSVD = "magnitude_prune_svd"
    /// CoPA-Merging (Graft's addition, not in PEFT): per-task pruning to `density`, row coefficients that restore
    /// each row's pruned mass, cross-task normalization of shared entries, then a truncated SVD (``CoPAMerging``).
    case copa

    /// Parses PEFT's name (`"ties_svd"`, ...); the error lists the accepted names.
    public init(peftName: String) throws {
        guard let t = CombinationType(rawValue: peftName) else {
            throw GraftError.invalid("combination_type '\(peftName)' is not one of: \(Self.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        self = t
    }

    /// Works on ΔW = s·B·A and re-factors it by SVD (names ending in `svd`, and `copa`).
    public var usesSVD: Bool { rawValue.hasSuffix("svd") || self == .copa }

    /// Needs `density` (every pruning method).
    public var needsDensity: Bool { sparsification != .none }

    /// Draws random masks (the DARE variants), so its result depends on the seed.
    public var isRandom: Bool { sparsification == .random }

    /// Combines the A's and B's separately, so every adapter must have the same rank.
    public var needsEqualRanks: Bool { !usesSVD && self != .cat }

    var sparsification: Sparsification {
        switch self {
        case .svd, .linear, .cat: return .none
        case .ties, .tiesSVD, .magnitudePrune, .magnitudePruneSVD, .copa: return .magnitude
        case .dareLinear, .dareTies, .dareLinearSVD, .dareTiesSVD: return .random
        }
    }

    var electsSign: Bool { [.ties, .tiesSVD, .dareTies, .dareTiesSVD].contains(self) }
}

/// What `add_weighted_adapter` is asked for: the sources, their weights and the combination's options, with
/// PEFT's names and defaults.
public struct AdapterCombination: Sendable {
    /// Names of the adapters to combine (all LoRA, all attached to the same model).
    public var adapters: [String]
    /// One weight per adapter; negative weights subtract (task arithmetic's negation).
    public var weights: [Double]
    /// How the adapters combine; with one adapter PEFT always uses `linear`.
    public var type: CombinationType
    /// The rank of an SVD-based result (default: the largest source rank).
    public var svdRank: Int?
    /// A quantile in [0, 1]: the SVD factors are clamped to ±(that quantile of their entries); nil: no clamping.
    public var svdClamp: Double?
    /// The fraction of entries kept by pruning, required by the pruning methods; 1 or more prunes nothing.
    public var density: Double?
    /// How TIES elects signs.
    public var majoritySignMethod: MajoritySignMethod
    /// Seeds DARE's random masks (the same seed gives the same adapter).
    public var seed: UInt64

    /// A combination with PEFT's defaults (`combination_type="svd"`, no clamp, `majority_sign_method="total"`).
    public init(adapters: [String], weights: [Double], type: CombinationType = .svd, svdRank: Int? = nil,
                svdClamp: Double? = nil, density: Double? = nil, majoritySignMethod: MajoritySignMethod = .total,
                seed: UInt64 = 0) {
        self.adapters = adapters
        self.weights = weights
        self.type = type
        self.svdRank = svdRank
        self.svdClamp = svdClamp
        self.density = density
        self.majoritySignMethod = majoritySignMethod
        self.seed = seed
    }

    /// Checks what does not depend on the model: counts, finiteness, density and clamp ranges.
    public func validate() throws {
        guard !adapters.isEmpty else { throw GraftError.invalid("adapters: at least one adapter name is required") }
        guard weights.count == adapters.count else {
            throw GraftError.invalid("weights: \(weights.count) weights for \(adapters.count) adapters (\(adapters.joined(separator: ", ")))")
        }
        for (name, w) in zip(adapters, weights) where !w.isFinite {
            throw GraftError.invalid("weights: the weight of adapter '\(name)' is \(w) (not finite)")
        }
        if let dup = Dictionary(grouping: adapters, by: { $0 }).first(where: { $0.value.count > 1 })?.key {
            throw GraftError.invalid("adapters: '\(dup)' is listed more than once")
        }
        if let r = svdRank, r <= 0 { throw GraftError.invalid("svd_rank must be positive, got \(r)") }
        if let q = svdClamp, !(q >= 0 && q <= 1) { throw GraftError.invalid("svd_clamp must be a quantile in [0, 1], got \(q)") }
        if let d = density, !(d >= 0 && d.isFinite) {
            throw GraftError.invalid("density must be a fraction in [0, 1], got \(d)")
        }
        if effectiveType.needsDensity && density == nil {
            throw GraftError.invalid("density is required for combination_type '\(effectiveType.rawValue)' (a fraction in [0, 1])")
        }
    }

    /// The type actually applied: PEFT combines a single adapter linearly whatever was asked.
    public var effectiveType: CombinationType { adapters.count == 1 ? .linear : type }
}
