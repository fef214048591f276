import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

/// A mixture of LoRA experts inside one Linear layer with a trainable router (MoV / MoLoRA, SiRA, top-p
/// dynamic routing, MoLA, MoELoRA): `g = softmax(x W_r)` per token over `E` experts and
/// `y = W x + b + Σₑ gₑ · s · Bₑ Aₑ x`, the sum restricted by the routing mode (see ``ExpertRoutingMode``).
///
/// In top-k and top-p modes the gates of a token's selected experts are renormalized to sum to 1
/// (`normalize_gates`, default true) and an expert only runs on the rows routed to it. Parameters (Graft keys,
/// no PEFT equivalent): `router.weight` `[E, in]`, `experts.lora_A` `[E, r, in]`, `experts.lora_B`
/// `[E, out, r]` (B starts at zero, so the layer starts as the identity).
///
/// While training, the layer keeps what its auxiliary losses need from each forward and hands them to the
/// trainer through the adapter's ``MixtureTrainingHook``. Every forward also updates ``statistics``.
public final class LoRAMixtureLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The module path of the layer (for statistics).
    public let path: String
    /// Router `[E, in]`.
    public let router: Tensor
    /// Expert down-projections `[E, r, in]`.
    public let loraA: Tensor
    /// Expert up-projections `[E, out, r]`.
    public let loraB: Tensor
    /// `α / r`.
    public let scaling: Float
    /// The routing settings.
    public let options: MixtureOptions
    /// Experts in this layer.
    public var experts: Int { router.shape[0] }
    /// Rank of every expert.
    public var rank: Int { loraA.shape[1] }
    /// Router statistics since the last reset.
    public internal(set) var statistics: RouterLayerStatistics
    /// Top-k routing with a capacity limit drops tokens by their order in the whole batch.
    public var couplesRows: Bool { options.mode == .topK && (options.capacityFactor ?? 0) > 0 }
    /// The last forward's routing decisions (nil before any).
    public internal(set) var lastPlan: RoutePlan?

    /// What one training forward leaves for the auxiliary losses.
    struct Pending {
        var logits: Tensor, probs: Tensor, x: Tensor, plan: RoutePlan
    }
    var pending: [Pending] = []

    /// Creates the layer: router and A Kaiming-uniform (bound 1/√in), B zero.
    public init(base: Linear, path: String, experts: Int, rank: Int, alpha: Float, options: MixtureOptions, state: AdapterState) {
        self.state = state
        self.path = path
        self.options = options
        scaling = alpha / Float(rank)
        let bound = 1 / Float(base.inFeatures).squareRoot()
        router = Tensor.randomUniform([experts, base.inFeatures], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        loraA = Tensor.randomUniform([experts, rank, base.inFeatures], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        loraB = Tensor(zeros: [experts, base.outFeatures, rank]).requiringGrad()
        statistics = RouterLayerStatistics(path: path, experts: experts)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("router.weight", router), ("experts.lora_A", loraA), ("experts.lora_B", loraB)]
    }

    public func deltaWeight(base: Linear) -> Tensor? { nil }

    /// Router logits `[T, E]` with gate dropout while training (inverted dropout on the logits, as SiRA).
    func routerLogits(_ x2: Tensor) -> Tensor {
        let logits = linear(x2, router)
        let p = options.gateDropout
        guard p > 0, state.isTraining else { return logits }
        let mask = Tensor(zeros: logits.shape)
        let keep = 1 - p
        for i in 0..<mask.count { mask.pointer[i] = state.rng.nextUniform() < keep ? 1 / keep : 0 }
        return logits * mask
    }

    /// The gate tensor `[T, E]` actually applied: the softmax, masked to the dispatched experts (renormalized
    /// over the selected ones when `normalize_gates`), recorded for autograd.
    func gates(probs: Tensor, plan: RoutePlan) -> Tensor {
        guard options.mode != .soft else { return probs }
        let shape = probs.shape
        let dispatched = Tensor(shape: shape, values: plan.dispatched)
        guard options.normalizeGates else { return probs * dispatched }
        let selected = probs * Tensor(shape: shape, values: plan.selected)
        let total = matmul(selected, Tensor(repeating: 1, shape: [plan.experts, 1])) + Tensor(repeating: 1e-9, shape: [1])
        return selected * reciprocal(total) * dispatched
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let tokens = x.rows
        guard tokens > 0 else { return y }
        let x2 = x.reshaped([tokens, x.lastDim])
        let logits = routerLogits(x2)
        let probs = softmax(logits)
        let plan = RoutePlan.make(probs: UnsafeBufferPointer(probs.buffer), tokens: tokens, experts: experts, mode: options.mode,
                                  topK: options.topK, topP: options.topP, capacityFactor: options.capacityFactor)
        let g = gates(probs: probs, plan: plan)
        statistics.record(probs: probs, gates: g, plan: plan)
        lastPlan = plan
        if state.isTraining && GradMode.isEnabled && options.needsAuxiliary {
            // Kept until the trainer asks for the losses; bounded for forwards no trainer consumes.
            if pending.count >= 64 { pending.removeFirst() }
            pending.append(Pending(logits: logits, probs: probs, x: x2, plan: plan))
        }
        let delta = routedLoRAExperts(x2, a: loraA, b: loraB, gates: g, rows: plan.rows, scaling: scaling)
        return y + delta.reshaped(y.shape)
    }

    // MARK: Auxiliary losses

    /// The weighted sum of the enabled auxiliary losses over the forwards since the last call (then cleared).
    public func auxiliaryLoss() -> Tensor? {
        defer { pending.removeAll() }
        var total: Tensor?
        func add(_ t: Tensor, _ w: Float) {
            guard w != 0 else { return }
            let term = t * w
            total = total.map { $0 + term } ?? term
        }
        for p in pending {
            add(MixtureLosses.loadBalancing(probs: p.probs, plan: p.plan), options.loadBalancingWeight)
            add(MixtureLosses.zLoss(logits: p.logits), options.zLossWeight)
            if options.contrastiveWeight != 0,
               let c = MixtureLosses.contrastive(x: p.x, a: loraA, b: loraB, plan: p.plan,
                                                 temperature: options.contrastiveTemperature,
                                                 maxTokens: options.contrastiveTokens, rng: &state.rng) {
                add(c, options.contrastiveWeight)
            }
        }
        return total
    }
}

/// The training hook of a `LORA_MOE` adapter: adds every layer's auxiliary router losses to the trainer's loss.
public final class MixtureTrainingHook: AdapterTrainingHook {
    /// The adapter's mixture layers.
    public let layers: [LoRAMixtureLayer]

    /// A hook over `layers`.
    public init(layers: [LoRAMixtureLayer]) { self.layers = layers }

    /// The sum of the layers' weighted auxiliary losses from the forwards since the last call.
    public func regularization() -> Tensor? {
        var total: Tensor?
        for l in layers {
            if let t = l.auxiliaryLoss() { total = total.map { $0 + t } ?? t }
        }
        return total
    }

    /// Nothing to do after an update.
    public func didUpdate(step: Int, totalSteps: Int) {}
}

/// The routing settings of a mixture adapter (shared by its layers).
public struct MixtureOptions: Sendable, Equatable {
    /// Routing mode (`routing`).
    public var mode: ExpertRoutingMode = .soft
    /// Experts per token in top-k mode (`top_k`).
    public var topK: Int = 2
    /// Probability mass in top-p mode (`top_p`).
    public var topP: Float = 0.5
    /// Capacity factor `c` in top-k mode (`capacity_factor`); 0 or nil: unlimited.
    public var capacityFactor: Float? = 1.0
    /// Dropout on the router logits while training (`gate_dropout`).
    public var gateDropout: Float = 0
    /// Renormalize the selected gates to sum to 1 (`normalize_gates`).
    public var normalizeGates: Bool = true
    /// Weight of the Switch load-balancing loss (`load_balancing_loss_weight`).
    public var loadBalancingWeight: Float = 0
    /// Weight of the router z-loss (`router_z_loss_weight`).
    public var zLossWeight: Float = 0
    /// Weight of the contrastive expert loss (`contrastive_loss_weight`).
    public var contrastiveWeight: Float = 0
    /// Temperature of the contrastive loss (`contrastive_temperature`).
    public var contrastiveTemperature: Float = 0.1
    /// Tokens sampled per layer and forward for the contrastive loss (`contrastive_tokens`).
    public var contrastiveTokens: Int = 32

    /// Defaults: soft routing, no auxiliary losses.
    public init() {}

    var needsAuxiliary: Bool { loadBalancingWeight != 0 || zLossWeight != 0 || contrastiveWeight != 0 }
}

/// The auxiliary router losses, each recorded for autograd.
public enum MixtureLosses {
    /// Switch-style load balancing `E · Σₑ fₑ · Pₑ`: `fₑ` is the fraction of the (token, expert) selections
    /// (before capacity; the argmax in soft mode) that chose `e`, `Pₑ` the mean router probability of `e`.
    /// Equals 1 when both are uniform. Gradient flows through `P` only. `scale` multiplies expert `e`'s term by
    /// `scale[e]` (HMoE's size penalty); nil: 1.
    public static func loadBalancing(probs: Tensor, plan: RoutePlan, scale: [Float]? = nil) -> Tensor {
        let t = plan.tokens, e = plan.experts
        var f = [Float](repeating: 0, count: e)
        if plan.rows.allSatisfy({ $0 == nil }) {
            for i in 0..<t {
                var best = 0
                for j in 1..<max(e, 1) where probs.pointer[i * e + j] > probs.pointer[i * e + best] { best = j }
                f[best] += 1
            }
        } else {
            for i in 0..<(t * e) { f[i % e] += plan.selected[i] }
        }
        let n = max(f.reduce(0, +), 1)
        let coef = f.enumerated().map { j, fj in Float(e) * fj / n / Float(max(t, 1)) * (scale?[j] ?? 1) }
        // L = Σ_t Σ_e coef_e · p[t, e].
        var value: Float = 0
        for i in 0..<t { for j in 0..<e { value += coef[j] * probs.pointer[i * e + j] } }
        return Tensor.recordingCustomOp(Tensor(scalar: value), inputs: [probs]) { g in
            let d = Tensor(zeros: probs.shape)
            let s = g.pointer[0]
            for i in 0..<t { for j in 0..<e { d.pointer[i * e + j] = s * coef[j] } }
            return [d]
        }
    }

    /// Router z-loss (ST-MoE): the mean over tokens of `(log Σₑ exp logit)²`.
    public static func zLoss(logits: Tensor) -> Tensor {
        let t = logits.rows, e = logits.lastDim
        var lse = [Float](repeating: 0, count: t)
        var value: Double = 0
        for i in 0..<t {
            let row = logits.pointer + i * e
            var m = -Float.infinity
            for j in 0..<e { m = max(m, row[j]) }
            var s: Float = 0
            for j in 0..<e { s += Foundation.exp(row[j] - m) }
            lse[i] = m + Foundation.log(s)
            value += Double(lse[i] * lse[i])
        }
        let n = Float(max(t, 1))
        return Tensor.recordingCustomOp(Tensor(scalar: Float(value) / n), inputs: [logits]) { g in
            let d = Tensor(zeros: logits.shape)
            let s = g.pointer[0]
            for i in 0..<t {
                let row = logits.pointer + i * e
                let c = s * 2 * lse[i] / n
                for j in 0..<e { d.pointer[i * e + j] = c * Foundation.exp(row[j] - lse[i]) }
            }
            return [d]
        }
    }

    /// Contrastive expert loss (MoELoRA), an InfoNCE over the experts that process the same token: each
    /// expert output `oᵢ = Bᵢ Aᵢ x` (ℓ2-normalized) must be told apart from the other experts' outputs on that
    /// token, with itself as the positive: `Lᵢ = −log( e^{1/τ} / Σⱼ e^{cos(oᵢ, oⱼ)/τ} )` over the token's
    /// selected experts `j` (itself included), averaged over every (token, expert) of tokens with ≥ 2 experts.
    /// Minimizing it lowers the cosine similarity between experts' outputs (for two experts it is
    /// `log(1 + e^{(cos − 1)/τ})`). Up to `maxTokens` such tokens are sampled per call. Nil when no token has
    /// two experts.
    public static func contrastive(x: Tensor, a: Tensor, b: Tensor, plan: RoutePlan, temperature: Float,
                                   maxTokens: Int, rng: inout GraftRNG) -> Tensor? {
        let e = plan.experts, r = a.shape[1], inF = a.shape[2], outF = b.shape[1]
        var eligible = (0..<plan.tokens).filter { t in
            (0..<e).reduce(0) { $0 + (plan.selected[t * e + $1] != 0 ? 1 : 0) } >= 2
        }
        guard !eligible.isEmpty, e >= 2 else { return nil }
        if eligible.count > maxTokens {
            for i in 0..<maxTokens {
                let j = i + Int(rng.next() % UInt64(eligible.count - i))
                eligible.swapAt(i, j)
            }
            eligible = Array(eligible.prefix(maxTokens))
        }
        let m = eligible.count
        let xs = embedding(eligible.map(Int32.init), table: x)  // [m, in]
        var normalized: [Tensor] = []
        for j in 0..<e {
            let aj = a.slice(dim: 0, j..<(j + 1)).reshaped([r, inF])
            let bj = b.slice(dim: 0, j..<(j + 1)).reshaped([outF, r])
            let o = linear(linear(xs, aj), bj)  // [m, out]
            let norm = sqrt(matmul(o * o, Tensor(repeating: 1, shape: [outF, 1])) + Tensor(repeating: 1e-12, shape: [1]))
            normalized.append((o * reciprocal(norm)).reshaped([m, 1, outF]))
        }
        let stacked = concat(normalized, dim: 1)  // [m, E, out]
        let sims = matmul(stacked, stacked, transposeB: true) * (1 / temperature)  // [m, E, E]
        // Mask: pairs outside the token's selected set get −1e9; rows outside it get weight 0.
        var maskValues = [Float](repeating: 0, count: m * e * e)
        var diag = [Float](repeating: 0, count: m * e * e)
        var count: Float = 0
        for (i, t) in eligible.enumerated() {
            for p in 0..<e {
                let rowSel = plan.selected[t * e + p] != 0
                if rowSel { count += 1; diag[(i * e + p) * e + p] = 1 }
                for q in 0..<e where !(rowSel && plan.selected[t * e + q] != 0) { maskValues[(i * e + p) * e + q] = -1e9 }
            }
        }
        let logp = logSoftmax(sims + Tensor(shape: [m, e, e], values: maskValues))
        return sum(logp * Tensor(shape: [m, e, e], values: diag)) * (-1 / max(count, 1))
    }
}
