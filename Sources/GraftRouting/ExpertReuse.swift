import Foundation
import GraftModels
import GraftTensor

/// Settings of ``ExpertReuse``.
public struct ExpertReuseOptions: Sendable {
    /// Layers on each side whose experts a layer's router may also pick (ReXMoE's reuse window); nil: every
    /// layer's (one pool shared across layers, each layer with its own router).
    public var window: Int? = 1
    /// Added to the router bias of every borrowed expert (negative: a new pool starts close to the layer's own
    /// routing).
    public var borrowedBias: Float = 0
    /// How the routed experts' outputs are combined; `probability` lets the routers train through the output.
    public var combine: MoECombine = .probability
    /// Defaults: window 1, no bias shift, probability combining.
    public init() {}
}

/// Experts reused across layers on an MoE base (``MoEfication``, HMoE): ReXMoE (Tan et al., 2025; each layer's
/// router picks among its own experts and those of the layers within a window, the pool growing during training
/// by progressive scaling routing, ``setReach(_:of:)``) and cross-layer shared experts with per-layer routers (the
/// window covering every layer).
///
/// Each layer's block is rebuilt with the experts of its source layers in layer order; a borrowed expert's router
/// row starts as its own layer's row (adjacent residual streams are alike), its bias shifted by
/// ``ExpertReuseOptions/borrowedBias``. The experts are the layers' weights, copied once per distinct source list
/// and frozen (window `w`: each layer holds `2w + 1` layers' experts in float32; the shared pool: one copy of
/// every layer's experts that all blocks read): reuse is a routing change, trained through the routers
/// (``trainableParameters(of:)``). Departure: the paper trains experts and routers from scratch.
public enum ExpertReuse {
    /// Rebuilds every MoE block of `model` for reuse and returns each layer's source layers (ascending).
    /// Throws, leaving the model unchanged, unless every layer has an MoE block with the same expert layout that
    /// does not already reuse experts.
    @discardableResult
    public static func apply(to model: LlamaModel, options: ExpertReuseOptions) throws -> [[Int]] {
        let blocks = model.layers.map { $0.feedForwardOverride as? MoEFeedForward }
        let count = blocks.count
        guard count >= 1, let first = blocks.first ?? nil else { throw GraftError(.state, "expert reuse needs an MoE base (graft moefy): layer 0 has no MoE block") }
        for (i, b) in blocks.enumerated() {
            guard let b else { throw GraftError(.state, "expert reuse needs an MoE block in every layer; layer \(i) has none") }
            guard b.expertLayers == nil, b.adapters.isEmpty, b.expertSizes == first.expertSizes else {
                throw GraftError(.state, "layer \(i)'s MoE block already reuses experts, carries adapters or has experts of sizes \(b.expertSizes) (layer 0: \(first.expertSizes))")
            }
        }
        if let w = options.window, w < 0 { throw GraftError.invalid("expert reuse: window \(w) must be ≥ 0") }
        guard options.borrowedBias.isFinite else { throw GraftError.invalid("expert reuse: borrowed bias \(options.borrowedBias) must be finite") }
        let own = blocks.compactMap { $0 }
        var sourcesPerLayer: [[Int]] = []
        var rebuilt: [MoEFeedForward] = []
        var pools: [[Int]: (gate: Tensor, up: Tensor, down: Tensor)] = [:]
        for i in 0..<count {
            let reach = options.window ?? count
            let sources = Array(max(0, i - reach)...min(count - 1, i + reach))
            let parts = sources.map { own[$0] }
            let pool = pools[sources] ?? (stacked(parts.map(\.gateWeight)), stacked(parts.map(\.upWeight)), stacked(parts.map(\.downWeight)))
            pools[sources] = pool
            let biases = zip(sources, parts).flatMap { j, b in b.routerBias.scalars.map { j == i ? $0 : $0 + options.borrowedBias } }
            let block = try MoEFeedForward(path: own[i].path, partition: parts.flatMap(\.partition),
                                           gate: pool.gate, up: pool.up, down: pool.down, routerWeight: stacked(parts.map(\.routerWeight)),
                                           routerBias: Tensor(shape: [biases.count], values: biases), topK: own[i].topK,
                                           expertSizes: Array(repeating: first.expertSizes, count: sources.count).flatMap { $0 })
            block.combine = options.combine
            block.topP = own[i].topP
            block.expertLayers = sources.flatMap { [Int](repeating: $0, count: first.experts) }
            rebuilt.append(block)
            sourcesPerLayer.append(sources)
        }
        for (layer, block) in zip(model.layers, rebuilt) { layer.feedForwardOverride = block }
        return sourcesPerLayer
    }

    /// `tensors` (equal trailing shapes) stacked on the first axis, copied.
    static func stacked(_ tensors: [Tensor]) -> Tensor {
        let first = tensors[0]
        let out = Tensor(zeros: [tensors.reduce(0) { $0 + $1.shape[0] }] + Array(first.shape.dropFirst()))
        var offset = 0
        for t in tensors {
            (out.pointer + offset).update(from: t.pointer, count: t.count)
            offset += t.count
        }
        return out
    }

    /// ReXMoE's progressive scaling routing: each reusing block's candidates become the experts of the layers
    /// within `reach` of its own (0: its own experts only, the MoE base's routing); nil lifts the limit.
    public static func setReach(_ reach: Int?, of model: LlamaModel) {
        for (i, b) in model.moeBlocks.enumerated() {
            guard let layers = b.expertLayers else { continue }
            guard let reach else { b.candidateMask = nil; continue }
            b.candidateMask = Tensor(shape: [b.experts], values: layers.map { abs($0 - i) <= reach ? 0 : -1e30 })
        }
    }

    /// The routers of every reusing block, marked as requiring gradients (the experts stay frozen).
    public static func trainableParameters(of model: LlamaModel) -> [Tensor] {
        model.moeBlocks.filter { $0.expertLayers != nil }.flatMap { [$0.routerWeight, $0.routerBias] }.map { $0.requiringGrad() }
    }

    /// Over every reusing block's statistics, the fraction of dispatched tokens that went to borrowed experts.
    public static func borrowedShare(of model: LlamaModel) -> Double {
        var borrowed = 0, total = 0
        for (i, b) in model.moeBlocks.enumerated() {
            guard let layers = b.expertLayers else { continue }
            for (e, n) in b.statistics.dispatchedTokens.enumerated() {
                total += n
                if layers[e] != i { borrowed += n }
            }
        }
        return total > 0 ? Double(borrowed) / Double(total) : 0
    }
}
