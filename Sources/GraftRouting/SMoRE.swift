import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

/// S'MoRE (Zeng et al., 2025, "Structural Mixture of Residual Experts for LLM Fine-tuning", seed #58) on one Linear
/// layer, as Graft reads the abstract: the expert weights are decomposed hierarchically into low-rank residuals
/// on `L` levels, and each token is routed through a sub-tree of them.
///
/// Level `ℓ` holds `E_ℓ` residuals, each a down-projection `A_ℓ,j` `[r, in]` giving features `z_ℓ,j = A_ℓ,j x`.
/// Routing is hierarchical: the root router picks, per token, the top-`k_0` level-0 residuals with gates
/// `g = softmax(R_0 x)`; every picked parent `p` on level `ℓ−1` then picks its own top-`k_ℓ` children on level `ℓ`
/// with `softmax(R_ℓ z_ℓ−1,p)`, a router over the parent's residual features, so different parents grow different
/// sub-trees (the "structural flexibility": many more distinct trees than residuals instantiated). Kept gates are
/// the router's probabilities (not renormalized). A node's value is its features plus its children's, propagated
/// up one level by a learned `r × r` map `P_ℓ` (the abstract's inter-layer propagation as a linear GNN):
/// `h(p) = z_p + Σ_children g_c · P_ℓ h(c)`, and the layer adds `(α/r) · B Σ_roots g_j h(j)`. Being linear, the tree
/// sum is computed level by level from path weights (`w_ℓ = w_ℓ−1 · G_ℓ`), never materializing the `Π k_ℓ` paths.
///
/// Parameters (Graft keys, no PEFT equivalent): `smore_router_0` `[E_0, in]`, `smore_router_ℓ` `[E_ℓ, r]` (ℓ ≥ 1),
/// `smore_A_ℓ` `[E_ℓ, r, in]`, `smore_P_ℓ` `[r, r]` (ℓ ≥ 1, identity at start), `smore_B` `[out, r]` (zero at
/// start: a new adapter leaves the layer as it was). Routers and A Kaiming-uniform (bound `1/√fan_in`). Each level
/// has its router statistics (level ≥ 1 counts one routed (token, parent) pair as a token). Not mergeable.
public final class SMoRELayer: LinearAdapterMethod, RouterStatisticsReporting {
    public let state: AdapterState
    /// The module path (for statistics).
    public let path: String
    /// Per level, the router: `[E_0, in]` on the input, `[E_ℓ, r]` on the parent's features for ℓ ≥ 1.
    public let routers: [Tensor]
    /// Per level, the residuals' down-projections `[E_ℓ, r, in]`.
    public let down: [Tensor]
    /// Per level ℓ ≥ 1, the propagation `[r, r]` from level ℓ to ℓ−1 (index ℓ−1).
    public let propagation: [Tensor]
    /// The shared up-projection `[out, r]`.
    public let up: Tensor
    /// Children kept per parent (roots per token on level 0), per level.
    public let topK: [Int]
    /// `α / r`.
    public let scaling: Float
    /// Per level, what its router did since the last reset.
    public internal(set) var statistics: [RouterLayerStatistics]

    /// Residuals of rank `rank` on `experts.count` levels (at least one) of `experts[ℓ]` each, keeping `topK[ℓ]` per
    /// parent.
    public init(base: Linear, path: String, rank: Int, alpha: Float, experts: [Int], topK: [Int], state: AdapterState) {
        self.state = state
        self.path = path
        let inF = base.inFeatures
        let inBound = 1 / Float(inF).squareRoot(), rankBound = 1 / Float(rank).squareRoot()
        var routers: [Tensor] = [], down: [Tensor] = [], propagation: [Tensor] = []
        for (level, e) in experts.enumerated() {
            let width = level == 0 ? inF : rank, bound = level == 0 ? inBound : rankBound
            routers.append(Tensor.randomUniform([e, width], low: -bound, high: bound, rng: &state.rng).requiringGrad())
            down.append(Tensor.randomUniform([e, rank, inF], low: -inBound, high: inBound, rng: &state.rng).requiringGrad())
            if level > 0 {
                let p = Tensor(zeros: [rank, rank])
                for i in 0..<rank { p.pointer[i * rank + i] = 1 }
                propagation.append(p.requiringGrad())
            }
        }
        self.routers = routers
        self.down = down
        self.propagation = propagation
        up = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        self.topK = zip(topK, experts).map { min(max($0, 1), $1) }
        scaling = alpha / Float(rank)
        statistics = experts.enumerated().map { RouterLayerStatistics(path: path + ".smore.level\($0.offset)", experts: $0.element) }
    }

    /// Levels `L`.
    public var levels: Int { down.count }
    /// The rank `r`.
    public var rank: Int { up.shape[1] }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        var out: [(name: String, tensor: Tensor)] = []
        for l in 0..<levels {
            out += [("smore_router_\(l)", routers[l]), ("smore_A_\(l)", down[l])]
            if l > 0 { out.append(("smore_P_\(l)", propagation[l - 1])) }
        }
        return out + [("smore_B", up)]
    }

    public func deltaWeight(base: Linear) -> Tensor? { nil }

    public var routerStatistics: [RouterLayerStatistics] { statistics }

    public func resetRouterStatistics() { statistics = statistics.map { RouterLayerStatistics(path: $0.path, experts: $0.experts) } }

    /// Top-`k` gates of `logits` `[rows, E]` (the kept softmax probabilities, recorded for autograd) and the plan.
    func route(_ logits: Tensor, k: Int) -> (gates: Tensor, probs: Tensor, plan: RoutePlan) {
        let probs = softmax(logits)
        let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: probs.pointer, count: probs.count), tokens: probs.rows,
                                  experts: probs.lastDim, mode: .topK, topK: k, topP: 1, capacityFactor: nil)
        return (probs * Tensor(shape: probs.shape, values: plan.dispatched), probs, plan)
    }

    /// Records level `level`'s routing over the rows whose parent is on a picked path (`onPath`, one flag per row);
    /// returns which children are then on a picked path, `[tokens · E_level]`.
    func recordLevel(_ level: Int, probs: Tensor, gates: Tensor, plan: RoutePlan, onPath: [Float], parents: Int) -> [Float] {
        let e = probs.lastDim, rowsN = probs.rows
        let kept = (0..<rowsN).filter { onPath[$0] != 0 }
        let subProbs = Tensor(zeros: [kept.count, e]), subGates = Tensor(zeros: [kept.count, e])
        let pp = probs.pointer, pg = gates.pointer, sp = subProbs.pointer, sg = subGates.pointer
        for (i, row) in kept.enumerated() {
            (sp + i * e).update(from: pp + row * e, count: e)
            (sg + i * e).update(from: pg + row * e, count: e)
        }
        let subPlan = RoutePlan.make(probs: UnsafeBufferPointer(start: sp, count: subProbs.count), tokens: kept.count, experts: e,
                                     mode: .topK, topK: topK[level], topP: 1, capacityFactor: nil)
        statistics[level].record(probs: subProbs, gates: subGates, plan: subPlan)
        var next = [Float](repeating: 0, count: rowsN / parents * e)
        for row in kept {
            let token = row / parents
            for c in 0..<e where plan.dispatched[row * e + c] != 0 { next[token * e + c] = 1 }
        }
        return next
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        guard x.rows > 0, levels > 0 else { return y }
        let x2 = x.reshaped([x.rows, x.lastDim]), tokens = x2.rows, r = rank
        // Every residual's features at once per level: [T, E_ℓ · r].
        let features = down.map { linear(x2, $0.reshaped([$0.shape[0] * r, $0.shape[2]])) }
        let root = route(linear(x2, routers[0]), k: topK[0])
        var onPath = recordLevel(0, probs: root.probs, gates: root.gates, plan: root.plan,
                                 onPath: [Float](repeating: 1, count: tokens), parents: 1)
        let e0 = routers[0].shape[0]
        // Path weights w_ℓ [T, 1, E_ℓ] and each level's gated feature sums v_ℓ [T, 1, r].
        var weights = root.gates.reshaped([tokens, 1, e0])
        var sums = [matmul(weights, features[0].reshaped([tokens, e0, r]))]
        for level in 1..<levels {
            let parents = routers[level - 1].shape[0], children = routers[level].shape[0]
            let child = route(linear(features[level - 1].reshaped([tokens * parents, r]), routers[level]), k: topK[level])
            onPath = recordLevel(level, probs: child.probs, gates: child.gates, plan: child.plan, onPath: onPath, parents: parents)
            weights = matmul(weights, child.gates.reshaped([tokens, parents, children]))
            sums.append(matmul(weights, features[level].reshaped([tokens, children, r])))
        }
        // h = v_0 + P_1 (v_1 + P_2 (v_2 + …)), row vectors: m ← v_ℓ−1 + m P_ℓᵀ.
        var m = sums[levels - 1].reshaped([tokens, r])
        for level in stride(from: levels - 1, to: 0, by: -1) {
            m = sums[level - 1].reshaped([tokens, r]) + linear(m, propagation[level - 1])
        }
        return y + (linear(m, up) * scaling).reshaped(y.shape)
    }
}

/// S'MoRE (`peft_type: "SMORE"`, Graft's own type): hierarchical residual low-rank experts routed per token as a
/// sub-tree (see ``SMoRELayer``). Keys: `r` (8), `lora_alpha` (16; scaling `α/r`), `num_levels` (2),
/// `num_experts` (4, or a list with one count per level), `top_k` (2, or a list per level: roots per token on
/// level 0, children per parent below), `target_modules`, `lora_dropout` (0 only).
public enum SMoREFactory: AdapterMethodFactory {
    public static let peftType = "SMORE"
    public static let family = "hierarchical residual low-rank experts routed as sub-trees (S'MoRE)"
    public static let mergeable = false

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 4, "lora_alpha": 8, "num_levels": 2, "num_experts": 4, "top_k": 2, "target_modules": targets]
    }

    /// `key` as one positive integer per level: a list of `levels` entries, or one integer for every level.
    static func perLevel(_ config: AdapterConfig, _ key: String, levels: Int, default fallback: Int) throws -> [Int] {
        if let list = config.value(key) as? [Int] {
            guard list.count == levels, list.allSatisfy({ $0 >= 1 && $0 <= 4096 }) else {
                throw GraftError.invalid("\(config.source): '\(key)' must list \(levels) integers in 1...4096 (one per level of num_levels), got \(list)")
            }
            return list
        }
        let v = try config.int(key, default: fallback)
        guard v >= 1, v <= 4096 else { throw GraftError.invalid("\(config.source): '\(key)' must be in 1...4096, got \(v)") }
        return [Int](repeating: v, count: levels)
    }

    /// The validated options: rank, α, experts and top-k per level.
    static func options(_ config: AdapterConfig) throws -> (rank: Int, alpha: Float, experts: [Int], topK: [Int]) {
        let levels = try config.int("num_levels", default: 2)
        guard levels >= 1, levels <= 8 else { throw GraftError.invalid("\(config.source): 'num_levels' must be in 1...8, got \(levels)") }
        let r = try config.int("r", default: 8)
        guard r >= 1, r <= AdapterConfig.maximumSize else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let alpha = try config.double("lora_alpha", default: 16)
        guard alpha.isFinite else { throw GraftError.invalid("\(config.source): 'lora_alpha' must be finite, got \(alpha)") }
        let p = try config.double("lora_dropout", default: 0)
        guard p == 0 else { throw GraftError(.unsupported, "\(config.source): 'lora_dropout' \(p) is not supported by SMORE (use 0)") }
        let experts = try perLevel(config, "num_experts", levels: levels, default: 4)
        let topK = try perLevel(config, "top_k", levels: levels, default: 2)
        guard experts.reduce(0, +) * r <= AdapterConfig.maximumSize else {
            throw GraftError.invalid("\(config.source): num_experts \(experts) × r (\(r)) exceeds \(AdapterConfig.maximumSize)")
        }
        return (r, Float(alpha), experts, topK)
    }

    public static func validate(_ config: AdapterConfig) throws { _ = try options(config) }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let o = try options(config)
        return SMoRELayer(base: layer, path: path, rank: o.rank, alpha: o.alpha, experts: o.experts, topK: o.topK, state: state)
    }
}
