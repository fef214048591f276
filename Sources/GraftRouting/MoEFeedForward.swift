import Foundation
import GraftModels
import GraftTensor

/// How an MoE feed-forward block weighs the outputs of the experts a token is routed to.
public enum MoECombine: String, Sendable, CaseIterable {
    /// Each routed expert counts once (MoEfication: the sum over all experts is the dense block, so `k = E` is
    /// the dense model exactly, up to float rounding). The router only selects; it gets no gradient.
    case sum
    /// Each routed expert is scaled by the router's softmax probability for it, so the router trains through the
    /// output (the usual sparse-MoE gate).
    case probability
    /// Each routed expert is scaled by its probability renormalized over the token's routed experts (the softmax
    /// of the routed experts' logits, as Mixtral): with identical experts (upcycling) the block is the dense FFN.
    case normalizedProbability = "normalized_probability"
}

/// A SwiGLU feed-forward block split into `E` experts over sets of its intermediate neurons, with a router that
/// sends each token to its top-k (or top-p) experts: an MoE base made from a dense model (MoEfication, HMoE's
/// heterogeneous sizes, upcycling).
///
/// Expert `e` owns the `expertSizes[e]` dense neurons listed in its span of `partition` (spans in expert order);
/// its weights are those neurons' rows of `gate_proj`/`up_proj` and columns of `down_proj`, held in float32
/// (`[E, m, hidden]`, `[E, m, hidden]`, `[E, hidden, m]`, `m` the largest size; a smaller expert's slice is padded
/// with zeros it never reads), frozen unless made trainable. Tokens are grouped per expert and each expert's three
/// products run as one GEMM over its tokens (``routedSwiGLUExperts(_:gate:up:down:weights:rows:sizes:)``).
public final class MoEFeedForward: Module, FeedForwardBlock {
    /// The module path of the dense block it replaces (`model.layers.N.mlp`).
    public let path: String
    /// Experts `E`.
    public let experts: Int
    /// Neurons per expert slice `m` (the largest expert's size).
    public let expertSize: Int
    /// Neurons each expert uses (all `m` unless the experts are heterogeneous).
    public let expertSizes: [Int]
    /// Distinct dense neurons the experts cover (the dense block's intermediate size).
    public let denseNeurons: Int
    /// Width of the residual stream.
    public let hiddenSize: Int
    /// Experts each token runs (1...E).
    public var topK: Int
    /// When set, each token runs its smallest set of most probable experts whose probability reaches it (top-p
    /// routing, HMoE's dynamic alternative) instead of `topK`.
    public var topP: Float?
    /// Weight of the Switch load-balancing loss added to ``lastAuxiliaryLoss`` in training passes (0: none).
    public var balanceLossWeight: Float = 0
    /// Weight of HMoE's size penalty added to ``lastAuxiliaryLoss`` in training passes (0: none).
    public var sizePenaltyWeight: Float = 0
    /// The weighted auxiliary router losses of the last pass with gradients on, recorded for autograd; nil when
    /// both weights are 0 or the pass ran without gradients.
    public private(set) var lastAuxiliaryLoss: Tensor?
    /// How the routed experts' outputs are combined.
    public var combine: MoECombine = .sum
    /// The dense block's neuron indices in expert order: expert `e` owns the `expertSizes[e]` entries after
    /// those of experts `0..<e` (with equal sizes, `e·m ..< (e+1)·m`).
    public let partition: [Int32]
    /// `[E, m, hidden]`: each expert's rows of `gate_proj`.
    public let gateWeight: Tensor
    /// `[E, m, hidden]`: each expert's rows of `up_proj`.
    public let upWeight: Tensor
    /// `[E, hidden, m]`: each expert's columns of `down_proj`.
    public let downWeight: Tensor
    /// `[E, hidden]`: the router's weight (expert scores are `x Wᵀ + b`).
    public let routerWeight: Tensor
    /// `[E]`: the router's bias.
    public let routerBias: Tensor
    /// `[E·m]`: the L2 norm of each expert neuron's `down_proj` column (expert order), the weight of its
    /// activation in the expert importance.
    public let neuronNorms: Tensor
    /// What the router did since the statistics were last reset (the statistics every router in Graft keeps).
    public var statistics: RouterLayerStatistics
    /// When set, every forward pass also computes every expert's importance to compare the router's selection
    /// with each token's true top-k experts (costs a dense pass; for evaluation).
    public var checksAgreement = false
    /// Adapters tuning this block (ESFT's tuned experts, PERFT's routed LoRA experts), in attach order; the
    /// enabled ones take part in every forward pass.
    public var adapters: [any MoEBlockAdapter] = []
    /// A router that replaces the linear one (RMoE's recurrent router); nil: `x Wᵀ + b`.
    public var router: (any MoERouter)?
    /// `[E]`, added to every token's router logits before routing (test-time router rewiring); nil: none.
    public var logitOffset: Tensor?
    /// `[E]`: 0 for the experts a token may be routed to and -1e30 for the others (ReXMoE's growing pool of
    /// reused experts); nil: every expert.
    public var candidateMask: Tensor?
    /// For a block whose experts come from several layers (``ExpertReuse``), the layer each expert was made for
    /// (its own layer's first); nil: every expert is this layer's own.
    public internal(set) var expertLayers: [Int]?
    /// For a block whose router and experts are shared by a group of layers (``WideNet``), the group's layers.
    public internal(set) var sharedByLayers: [Int]?

    /// A block from its experts' weights (shapes above), `partition` (`Σ expertSizes` dense neuron indices, none
    /// repeated within an expert) and router; `expertSizes` nil: every expert uses all `m` neurons. Throws when a
    /// shape, a size or the partition does not fit.
    public init(path: String, partition: [Int32], gate: Tensor, up: Tensor, down: Tensor, routerWeight: Tensor,
                routerBias: Tensor, topK: Int, expertSizes: [Int]? = nil) throws {
        guard gate.rank == 3, up.shape == gate.shape, down.rank == 3 else {
            throw GraftError.invalid("\(path): expert weights must be [E, m, hidden] (gate, up) and [E, hidden, m] (down), got \(gate.shape), \(up.shape), \(down.shape)")
        }
        let e = gate.shape[0], m = gate.shape[1], h = gate.shape[2]
        guard e >= 1, m >= 1, down.shape == [e, h, m] else {
            throw GraftError.invalid("\(path): down weight has shape \(down.shape), expected [\(e), \(h), \(m)]")
        }
        guard routerWeight.shape == [e, h], routerBias.shape == [e] else {
            throw GraftError.invalid("\(path): router shapes \(routerWeight.shape), \(routerBias.shape), expected [\(e), \(h)] and [\(e)]")
        }
        guard (1...e).contains(topK) else { throw GraftError.invalid("\(path): top_k \(topK) must be in 1...\(e)") }
        let sizes = expertSizes ?? [Int](repeating: m, count: e)
        guard sizes.count == e, sizes.allSatisfy({ (1...m).contains($0) }) else {
            throw GraftError.invalid("\(path): expert sizes \(sizes) must be \(e) values in 1...\(m)")
        }
        denseNeurons = try MoEPartition.validateSpans(partition, sizes: sizes, what: path)
        self.path = path
        experts = e
        expertSize = m
        self.expertSizes = sizes
        hiddenSize = h
        self.topK = topK
        self.partition = partition
        gateWeight = gate
        upWeight = up
        downWeight = down
        self.routerWeight = routerWeight
        self.routerBias = routerBias
        statistics = RouterLayerStatistics(path: path, experts: e)
        neuronNorms = Self.columnNorms(down)
        super.init(typeName: "MoEFeedForward")
        register(parameter: "router.weight", routerWeight)
        register(parameter: "router.bias", routerBias)
        register(parameter: "experts.gate_proj", gate)
        register(parameter: "experts.up_proj", up)
        register(parameter: "experts.down_proj", down)
    }

    /// Router scores `[T, E]` for `x` `[T, hidden]`.
    public func routerLogits(_ x: Tensor) -> Tensor { linear(x, routerWeight, routerBias) }

    /// Routes `x` (`[..., hidden]`) to each token's top-k experts and sums their outputs; same shape as `x`.
    public func forward(_ x: Tensor) -> Tensor {
        let shape = x.shape
        let flat = x.reshaped([x.count / hiddenSize, hiddenSize])
        let tokens = flat.rows
        var logits = router?.logits(flat, block: self) ?? routerLogits(flat)
        if let logitOffset { logits = logits + logitOffset }
        if let candidateMask { logits = logits + candidateMask }
        let probs = softmax(logits)
        let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: probs.pointer, count: probs.count), tokens: tokens,
                                  experts: experts, mode: topP == nil ? .topK : .topP, topK: topK, topP: topP ?? 1,
                                  capacityFactor: nil)
        // k = E runs every expert on every token without gathering (the dense block, split in E products).
        let rows: [[Int32]?] = topP == nil && topK >= experts ? [[Int32]?](repeating: nil, count: experts) : plan.rows
        let weights: Tensor?
        switch combine {
        case .sum: weights = nil
        case .probability: weights = probs
        case .normalizedProbability:
            // The softmax over each token's routed experts: the others' logits pushed to -1e30 (exp gives 0).
            let mask = plan.selected.map { $0 != 0 ? Float(0) : -1e30 }
            weights = softmax(logits + Tensor(shape: [tokens, experts], values: mask))
        }
        lastAuxiliaryLoss = nil
        if GradMode.isEnabled, balanceLossWeight != 0 || sizePenaltyWeight != 0 {
            var aux: Tensor?
            if balanceLossWeight != 0 { aux = MixtureLosses.loadBalancing(probs: probs, plan: plan) * balanceLossWeight }
            if sizePenaltyWeight != 0 {
                let penalty = HMoE.sizePenalty(probs: probs, plan: plan, sizes: expertSizes) * sizePenaltyWeight
                aux = aux.map { $0 + penalty } ?? penalty
            }
            lastAuxiliaryLoss = aux
        }
        let sizes: [Int]? = isHeterogeneous ? expertSizes : nil
        let enabled = adapters.filter(\.isEnabled)
        var y: Tensor
        // A plain loop: a lazy compactMap's `first` runs the closure twice on the element it returns, and these
        // build expert-sized weights (and count tokens).
        var split: TokenExperts?, tuned: ReplacedExperts?
        for a in enabled where split == nil { split = a.tokenExperts(rows: tokens) }
        if split == nil { for a in enabled where tuned == nil { tuned = a.replacedExperts } }
        if let split {
            y = routedWithTokenExperts(flat, split, weights: weights, rows: rows, sizes: sizes)
        } else if let tuned {
            y = routedWithReplacedExperts(flat, tuned, weights: weights, rows: rows, sizes: sizes)
        } else {
            y = routedSwiGLUExperts(flat, gate: gateWeight, up: upWeight, down: downWeight, weights: weights, rows: rows,
                                    sizes: sizes)
        }
        for a in enabled { if let d = a.addedOutput(flat) { y = y + d } }
        let gates = Tensor(shape: [tokens, experts], values: plan.dispatched)
        if let weights {
            // In place: a temporary product's storage could be freed before it is read.
            let pg = gates.pointer, pp = weights.pointer
            for j in 0..<gates.count { pg[j] *= pp[j] }
        }
        statistics.record(probs: probs, gates: gates, plan: plan)
        if checksAgreement { recordAgreement(flat, selected: plan.selected) }
        return y.reshaped(shape)
    }

    /// The routed experts with experts `tuned.indices` running on `tuned`'s weights instead of the block's own:
    /// the block's experts run on their tokens except the replaced ones, the tuned weights on the replaced ones'
    /// tokens, and the two sums add up (routing weights reach both).
    func routedWithReplacedExperts(_ x: Tensor, _ tuned: ReplacedExperts, weights: Tensor?, rows: [[Int32]?],
                                   sizes: [Int]?) -> Tensor {
        var baseRows = rows
        for e in tuned.indices { baseRows[e] = [] }
        let base = routedSwiGLUExperts(x, gate: gateWeight, up: upWeight, down: downWeight, weights: weights, rows: baseRows,
                                       sizes: sizes)
        // The tuned experts' columns of the weights, [T, S], through a one-hot [E, S] product (recorded for autograd).
        let columns = weights.map { w -> Tensor in
            var onehot = [Float](repeating: 0, count: experts * tuned.indices.count)
            for (s, e) in tuned.indices.enumerated() { onehot[e * tuned.indices.count + s] = 1 }
            return matmul(w, Tensor(shape: [experts, tuned.indices.count], values: onehot))
        }
        let routed = routedSwiGLUExperts(x, gate: tuned.gate, up: tuned.up, down: tuned.down, weights: columns,
                                         rows: tuned.indices.map { rows[$0] }, sizes: sizes.map { s in tuned.indices.map { s[$0] } })
        return base + routed
    }

    /// The L2 norm of every column of each expert's `down` slice (`[E, hidden, m]`), in expert order `[E·m]`.
    public static func columnNorms(_ down: Tensor) -> Tensor {
        let e = down.shape[0], h = down.shape[1], m = down.shape[2]
        var norms = [Float](repeating: 0, count: e * m)
        let p = down.pointer
        for ex in 0..<e {
            for r in 0..<h {
                let row = p + (ex * h + r) * m
                for i in 0..<m { norms[ex * m + i] += row[i] * row[i] }
            }
        }
        return Tensor(shape: [e * m], values: norms.map { $0.squareRoot() })
    }

    /// Each token's importance of each expert, `[T, E]`: the sum over the expert's neurons of the activation's
    /// magnitude `|silu(gate x) · up x|` times the norm of the neuron's `down_proj` column, a bound on what the
    /// neuron adds to the output. Not recorded for autograd.
    public func expertImportance(_ x: Tensor) -> Tensor {
        withNoGrad {
            let tokens = x.rows, m = expertSize
            let out = Tensor(zeros: [tokens, experts])
            let g = Tensor(zeros: [tokens, m]), u = Tensor(zeros: [tokens, m]), a = Tensor(zeros: [tokens, m])
            for e in 0..<experts {
                sgemm(transA: false, transB: true, m: tokens, n: m, k: hiddenSize, a: x.pointer,
                      b: gateWeight.pointer + e * m * hiddenSize, c: g.pointer)
                sgemm(transA: false, transB: true, m: tokens, n: m, k: hiddenSize, a: x.pointer,
                      b: upWeight.pointer + e * m * hiddenSize, c: u.pointer)
                swigluForward(gate: g.pointer, up: u.pointer, out: a.pointer, count: tokens * m)
                let w = neuronNorms.pointer + e * m
                for t in 0..<tokens { out.pointer[t * experts + e] = weightedAbsSum(a.pointer + t * m, w, count: m) }
            }
            return out
        }
    }

    /// Adds the comparison of `selected` (`[T·E]`, 1 where routed) with each token's true top-k experts.
    func recordAgreement(_ x: Tensor, selected: [Float]) {
        let importance = expertImportance(x)
        let tokens = x.rows
        let hits = MoEPartition.topKHits(importance: importance, selected: selected, tokens: tokens, experts: experts, k: topK)
        statistics.agreementTokens += tokens
        statistics.agreementHits += hits
        statistics.agreementK = topK
    }

    /// Whether the experts differ in size (HMoE).
    public var isHeterogeneous: Bool { expertSizes.contains { $0 != expertSize } }

    /// Floating-point operations per token of the routed block (router plus `k` experts of the mean size) and of
    /// the dense block it was made from.
    public var flopsPerToken: (routed: Int, dense: Int) {
        let dense = 2 * 3 * hiddenSize * denseNeurons
        let meanSize = Double(expertSizes.reduce(0, +)) / Double(experts)
        return (2 * hiddenSize * experts + Int(2 * 3 * Double(hiddenSize) * meanSize * Double(topK)), dense)
    }

    /// Floating-point operations per token the routed block spent over the passes its ``statistics`` recorded
    /// (the router plus each dispatched expert at its own size); nil before any token.
    public var measuredFlopsPerToken: Double? {
        guard statistics.tokens > 0 else { return nil }
        let neurons = zip(statistics.dispatchedTokens, expertSizes).reduce(0.0) { $0 + Double($1.0 * $1.1) }
        return Double(2 * hiddenSize * experts) + 6 * Double(hiddenSize) * neurons / Double(statistics.tokens)
    }
}

/// A router that replaces an MoE block's linear one (``MoEFeedForward/router``).
public protocol MoERouter: AnyObject {
    /// Router scores `[T, E]` for the block's flat input `x` (`[T, hidden]`), recorded for autograd.
    func logits(_ x: Tensor, block: MoEFeedForward) -> Tensor
}

/// `Σ |p[j]| · w[j]` over `count` floats.
@inline(__always)
func weightedAbsSum(_ p: UnsafePointer<Float>, _ w: UnsafePointer<Float>, count: Int) -> Float {
    var acc = Float16x(repeating: 0)
    var j = 0
    while j + 16 <= count {
        let v = UnsafeRawPointer(p + j).loadUnaligned(as: Float16x.self)
        acc += v.replacing(with: -v, where: v .< 0) * UnsafeRawPointer(w + j).loadUnaligned(as: Float16x.self)
        j += 16
    }
    var s = acc.sum()
    while j < count { s += abs(p[j]) * w[j]; j += 1 }
    return s
}

extension LlamaModel {
    /// The MoE feed-forward blocks of the decoder layers, in layer order (empty for a dense model).
    public var moeBlocks: [MoEFeedForward] { layers.compactMap { $0.feedForwardOverride as? MoEFeedForward } }

    /// The indices of the layers ``moeBlocks`` sit in, in the same order.
    public var moeLayerIndices: [Int] { layers.indices.filter { layers[$0].feedForwardOverride is MoEFeedForward } }

    /// Router statistics of every MoE block (a stratified block's per stratum), in layer order.
    public var moeRouterStatistics: [RouterLayerStatistics] {
        layers.flatMap { layer -> [RouterLayerStatistics] in
            if let b = layer.feedForwardOverride as? MoEFeedForward { return [b.statistics] }
            return (layer.feedForwardOverride as? StratifiedMoE)?.statistics ?? []
        }
    }

    /// Clears the router statistics of every MoE block (and a stratified block's pass counts).
    public func resetMoERouterStatistics() {
        for b in moeBlocks { b.statistics = RouterLayerStatistics(path: b.path, experts: b.experts) }
        for b in StratifiedMoE.blocks(of: self) { b.resetStatistics() }
    }

    /// Sets every MoE block's `k`; throws when `k` is outside `1...E` of some block.
    public func setMoETopK(_ k: Int) throws {
        for b in moeBlocks {
            guard (1...b.experts).contains(k) else { throw GraftError.invalid("top_k \(k) must be in 1...\(b.experts) (\(b.path))") }
            b.topK = k
        }
    }

    /// The training objective of one batch on an MoE model: the mean next-token cross-entropy over `targets`
    /// (`[batch · length]`, -100 ignored) plus every block's auxiliary router loss. Recorded for autograd.
    public func moeTrainingLoss(batch: TokenBatch, targets: [Int32]) throws -> Tensor {
        var loss = try nextTokenLoss(batch: batch, targets: targets, method: "MoE training")
        for b in moeBlocks { if let aux = b.lastAuxiliaryLoss { loss = loss + aux } }
        return loss
    }

    /// Removes the MoE blocks: every layer runs its dense feed-forward block again.
    public func removeMoEBlocks() { for l in layers { l.feedForwardOverride = nil } }

    /// Throws when a dense MLP projection an MoE block would replace carries adapters (they would stop applying).
    func checkNoFeedForwardAdapters() throws {
        for (i, layer) in layers.enumerated() {
            if layer.denseFeedForwardProjections.contains(where: { !$0.adapters.isEmpty }) {
                throw GraftError(.state, "layer \(i)'s mlp projections carry adapters, which an MoE block would bypass; delete those adapters before making an MoE base")
            }
        }
    }
}
