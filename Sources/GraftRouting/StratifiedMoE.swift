import Foundation
import GraftModels
import GraftTensor

/// A stratified MoE feed-forward block (SMoE; Xu et al., 2023, "Towards Being Parameter-Efficient: A Stratified
/// Sparsely Activated Transformer with Dynamic Capacity", seed #61): the experts are arranged in strata, and a token
/// passes through a token-dependent number of them. Every token starts at stratum 0; at stratum `s` a router of its
/// own scores the experts of strata `s` and above (lower strata are masked out), the token runs its top-k of them,
/// the output is added to the token's stream, and the token moves on to the stratum after its top-1 expert's: a
/// token that picks an expert of a higher stratum skips the strata in between, and one that picks the last
/// stratum's leaves. A token therefore runs between 1 and `S` expert passes (its dynamic capacity). Before a stratum
/// `s ≥ 1` the stream is normalized by that stratum's own RMSNorm, as the paper's per-stratum layer norms.
///
/// Expert weights of all strata are stacked (`[E, m, hidden]`, `[E, m, hidden]`, `[E, hidden, m]`, `m` the largest
/// size, smaller experts padded as HMoE's); router `s` is `[E, hidden]` with the rows of lower-stratum experts unused
/// (their logits are masked to −1e30). At top-1 the chosen expert is weighed by its router probability; above, by
/// the probabilities renormalized over the chosen ones. Departure: the stratum passes run on the block's input,
/// which the decoder layer has already normed, and their sum is the block's output; the paper's strata act on the
/// residual stream itself.
public final class StratifiedMoE: Module, FeedForwardBlock {
    /// `model.layers.N.mlp`.
    public let path: String
    /// Experts per stratum.
    public let strata: [Int]
    /// Neurons each expert uses.
    public let expertSizes: [Int]
    /// Width of the residual stream.
    public let hiddenSize: Int
    /// Experts each token runs per stratum pass.
    public var topK: Int
    /// Weight of the Switch load-balancing loss over each stratum's tokens (0: none), in ``lastAuxiliaryLoss``.
    public var balanceLossWeight: Float = 0
    /// The weighted balance losses of the last pass with gradients on; nil otherwise.
    public private(set) var lastAuxiliaryLoss: Tensor?
    /// `[E, m, hidden]`.
    public let gateWeight: Tensor
    /// `[E, m, hidden]`.
    public let upWeight: Tensor
    /// `[E, hidden, m]`.
    public let downWeight: Tensor
    /// Stratum `s`'s router `[E, hidden]` and bias `[E]`.
    public let routers: [(weight: Tensor, bias: Tensor)]
    /// The RMSNorm scale `[hidden]` before stratum `s` (index `s − 1`).
    public let norms: [Tensor]
    /// The norms' epsilon.
    public let normEps: Float
    /// Per stratum, what its router did since the last reset (over the tokens that reached it).
    public var statistics: [RouterLayerStatistics]
    /// Tokens by the number of expert passes they ran (index `n − 1` for `n` passes), since the last reset.
    public var passHistogram: [Int]

    /// A block from its weights (shapes above); throws when a shape or setting does not fit.
    public init(path: String, strata: [Int], expertSizes: [Int], gate: Tensor, up: Tensor, down: Tensor,
                routers: [(weight: Tensor, bias: Tensor)], norms: [Tensor], normEps: Float, topK: Int) throws {
        let e = strata.reduce(0, +)
        guard !strata.isEmpty, strata.allSatisfy({ $0 >= 1 }), gate.rank == 3, gate.shape[0] == e, up.shape == gate.shape,
              down.shape == [e, gate.shape[2], gate.shape[1]] else {
            throw GraftError.invalid("\(path): stratified experts \(strata) do not fit weights \(gate.shape), \(up.shape), \(down.shape)")
        }
        let m = gate.shape[1], h = gate.shape[2]
        guard expertSizes.count == e, expertSizes.allSatisfy({ (1...m).contains($0) }) else {
            throw GraftError.invalid("\(path): expert sizes \(expertSizes) must be \(e) values in 1...\(m)")
        }
        guard routers.count == strata.count, routers.allSatisfy({ $0.weight.shape == [e, h] && $0.bias.shape == [e] }),
              norms.count == strata.count - 1, norms.allSatisfy({ $0.shape == [h] }) else {
            throw GraftError.invalid("\(path): need \(strata.count) routers [\(e), \(h)] and \(strata.count - 1) norms [\(h)]")
        }
        guard (1...e).contains(topK) else { throw GraftError.invalid("\(path): top_k \(topK) must be in 1...\(e)") }
        self.path = path
        self.strata = strata
        self.expertSizes = expertSizes
        hiddenSize = h
        self.topK = topK
        gateWeight = gate
        upWeight = up
        downWeight = down
        self.routers = routers
        self.norms = norms
        self.normEps = normEps
        statistics = strata.indices.map { RouterLayerStatistics(path: "\(path).stratum\($0)", experts: e) }
        passHistogram = [Int](repeating: 0, count: strata.count)
        super.init(typeName: "StratifiedMoE")
        register(parameter: "experts.gate_proj", gate)
        register(parameter: "experts.up_proj", up)
        register(parameter: "experts.down_proj", down)
        for (s, r) in routers.enumerated() {
            register(parameter: "strata.\(s).router.weight", r.weight)
            register(parameter: "strata.\(s).router.bias", r.bias)
        }
        for (i, n) in norms.enumerated() { register(parameter: "strata.\(i + 1).norm.weight", n) }
    }

    /// Experts `E` over all strata.
    public var experts: Int { strata.reduce(0, +) }

    /// The first expert index of stratum `s`.
    public func firstExpert(ofStratum s: Int) -> Int { strata.prefix(s).reduce(0, +) }

    /// The stratum expert `e` belongs to.
    public func stratum(ofExpert e: Int) -> Int {
        var end = 0
        for (s, n) in strata.enumerated() {
            end += n
            if e < end { return s }
        }
        return strata.count - 1
    }

    public func forward(_ x: Tensor) -> Tensor {
        let shape = x.shape
        let flat = x.reshaped([x.count / hiddenSize, hiddenSize])
        let tokens = flat.rows, e = experts
        var state = [Int](repeating: 0, count: tokens), passes = [Int](repeating: 0, count: tokens)
        var stream = flat
        var aux: Tensor?
        let heterogeneous = expertSizes.contains { $0 != gateWeight.shape[1] }
        for s in strata.indices {
            let here = (0..<tokens).filter { state[$0] == s }
            guard !here.isEmpty else { continue }
            let input = s == 0 ? stream : rmsNorm(stream, weight: norms[s - 1], eps: normEps)
            let first = firstExpert(ofStratum: s)
            let mask = Tensor(shape: [e], values: (0..<e).map { $0 < first ? -1e30 : 0 })
            let logits = linear(input, routers[s].weight, routers[s].bias) + mask
            let probs = softmax(logits)
            // Routing over the tokens at this stratum only.
            let local = gatherTensorRows(probs, here.map(Int32.init))
            let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: local.pointer, count: local.count), tokens: here.count,
                                      experts: e, mode: .topK, topK: min(topK, e - first), topP: 1, capacityFactor: nil)
            var rows = [[Int32]](repeating: [], count: e)
            var chosen = [Float](repeating: -1e30, count: tokens * e)
            for (i, t) in here.enumerated() {
                for j in 0..<e where plan.selected[i * e + j] != 0 {
                    rows[j].append(Int32(t))
                    chosen[t * e + j] = 0
                }
                let row = UnsafeBufferPointer(start: local.pointer + i * e, count: e)
                state[t] = stratum(ofExpert: RoutePlan.ranking(row)[0]) + 1
                passes[t] += 1
            }
            let weights = topK == 1 ? probs : softmax(logits + Tensor(shape: [tokens, e], values: chosen))
            let y = routedSwiGLUExperts(input, gate: gateWeight, up: upWeight, down: downWeight, weights: weights,
                                        rows: rows.map { Optional($0) }, sizes: heterogeneous ? expertSizes : nil)
            stream = stream + y
            let gates = Tensor(shape: local.shape, values: plan.dispatched)
            for j in 0..<gates.count { gates.pointer[j] *= local.pointer[j] }
            statistics[s].record(probs: local, gates: gates, plan: plan)
            if GradMode.isEnabled, balanceLossWeight != 0 {
                let selection = Tensor(shape: [here.count, tokens], values: here.enumerated().flatMap { i, t in
                    (0..<tokens).map { Float($0 == t ? 1 : 0) }
                })
                let loss = MixtureLosses.loadBalancing(probs: matmul(selection, probs), plan: plan) * balanceLossWeight
                aux = aux.map { $0 + loss } ?? loss
            }
        }
        lastAuxiliaryLoss = aux
        for n in passes where n >= 1 { passHistogram[n - 1] += 1 }
        return (stream - flat).reshaped(shape)
    }

    /// The mean number of expert passes per token since the last reset (nil before any token).
    public var meanPasses: Double? {
        let total = passHistogram.reduce(0, +)
        guard total > 0 else { return nil }
        return Double(passHistogram.enumerated().reduce(0) { $0 + ($1.offset + 1) * $1.element }) / Double(total)
    }

    /// Floating-point operations per token the block spent since the last reset: every router a token consulted
    /// and each dispatched expert at its own size; nil before any token.
    public var measuredFlopsPerToken: Double? {
        let total = passHistogram.reduce(0, +)
        guard total > 0 else { return nil }
        var neurons = 0.0, routerRuns = 0.0
        for st in statistics {
            neurons += zip(st.dispatchedTokens, expertSizes).reduce(0.0) { $0 + Double($1.0 * $1.1) }
            routerRuns += Double(st.tokens)
        }
        return (2 * Double(hiddenSize * experts) * routerRuns + 6 * Double(hiddenSize) * neurons) / Double(total)
    }

    /// Clears the statistics and the pass histogram.
    public func resetStatistics() {
        statistics = strata.indices.map { RouterLayerStatistics(path: "\(path).stratum\($0)", experts: experts) }
        passHistogram = [Int](repeating: 0, count: strata.count)
    }

    /// Every tensor of the block (routers, norms and experts).
    public var parameters: [Tensor] {
        [gateWeight, upWeight, downWeight] + routers.flatMap { [$0.weight, $0.bias] } + norms
    }
}
