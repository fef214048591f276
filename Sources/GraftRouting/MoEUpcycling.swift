import Foundation
import GraftModels
import GraftTensor

/// Settings of ``MoEUpcycling``.
public struct MoEUpcyclingOptions: Sendable {
    /// Experts per upcycled layer `E`, each a copy of the layer's FFN.
    public var experts = 4
    /// Experts each token runs.
    public var topK = 2
    /// The decoder layers upcycled, ascending; nil: every layer.
    public var layers: [Int]?
    /// Standard deviation of the new routers' weights (their biases start at 0).
    public var routerStd: Float = 0.02
    /// Seeds the routers.
    public var seed: UInt64 = 0
    /// Weight of the Switch load-balancing loss in training (the paper's auxiliary loss).
    public var balanceLossWeight: Float = 0.01
    /// Defaults: 4 experts, top-2, every layer.
    public init() {}
}

/// Sparse upcycling (Komatsuzaki et al., 2023): makes an MoE base from a dense decoder by replacing a layer's FFN
/// with `E` experts that are each a copy of it, and a new router. The top-k experts are weighed by their router
/// probabilities renormalized over the chosen ones (``MoECombine/normalizedProbability``), so the upcycled model
/// computes exactly the dense one until trained; training (experts and routers, with a load-balancing loss) then
/// lets the copies specialise. Each upcycled layer holds `E` float32 copies of its FFN (10.6 MB each for SmolLM2).
public enum MoEUpcycling {
    /// Replaces the feed-forward block of each layer in `options.layers` of `model` by its upcycled MoE block
    /// (existing MoE blocks are removed first) and returns the new blocks. Throws, leaving the model dense, when a
    /// setting does not fit the model.
    @discardableResult
    public static func apply(to model: LlamaModel, options: MoEUpcyclingOptions) throws -> [MoEFeedForward] {
        let count = model.layers.count
        let layers = options.layers ?? Array(0..<count)
        guard options.experts >= 1, (1...options.experts).contains(options.topK) else {
            throw GraftError.invalid("upcycling: top_k \(options.topK) must be in 1...experts (\(options.experts))")
        }
        try TokenDispatch.checkLayers(layers, count: count, method: "upcycling")
        guard options.routerStd.isFinite, options.routerStd >= 0, options.balanceLossWeight.isFinite, options.balanceLossWeight >= 0 else {
            throw GraftError.invalid("upcycling: router_std \(options.routerStd) and balance loss weight \(options.balanceLossWeight) must be finite and ≥ 0")
        }
        model.removeMoEBlocks()
        try model.checkNoFeedForwardAdapters()
        let ff = model.config.intermediateSize, h = model.config.hiddenSize, e = options.experts
        var rng = GraftRNG(seed: options.seed)
        var blocks: [(layer: Int, block: MoEFeedForward)] = []
        for i in layers.sorted() {
            let identity = (0..<ff).map(Int32.init)
            let (g, u, d) = MoEfication.expertWeights(layer: model.layers[i], partition: identity, sizes: [ff])
            let block = try MoEFeedForward(path: "model.layers.\(i).mlp", partition: Array(repeating: identity, count: e).flatMap { $0 },
                                           gate: replicated(g, e), up: replicated(u, e), down: replicated(d, e),
                                           routerWeight: Tensor.randomNormal([e, h], std: options.routerStd, rng: &rng),
                                           routerBias: Tensor(zeros: [e]), topK: options.topK)
            block.combine = .normalizedProbability
            block.balanceLossWeight = options.balanceLossWeight
            blocks.append((i, block))
        }
        for (i, b) in blocks { model.layers[i].feedForwardOverride = b }
        return blocks.map(\.block)
    }

    /// `E` copies of the one-expert tensor `t` (`[1, ...]`) stacked on the first axis.
    static func replicated(_ t: Tensor, _ copies: Int) -> Tensor {
        let out = Tensor(zeros: [copies] + Array(t.shape.dropFirst()))
        for c in 0..<copies { (out.pointer + c * t.count).update(from: t.pointer, count: t.count) }
        return out
    }

    /// What trains after upcycling: every MoE block's router, and its experts when `experts` is set; each is
    /// marked as requiring gradients.
    public static func trainableParameters(of model: LlamaModel, experts: Bool = true) -> [Tensor] {
        model.moeBlocks.flatMap { b in
            [b.routerWeight, b.routerBias] + (experts ? [b.gateWeight, b.upWeight, b.downWeight] : [])
        }.map { $0.requiringGrad() }
    }

    /// The training objective of one batch on the upcycled `model`: ``GraftModels/LlamaModel/moeTrainingLoss(batch:targets:)``.
    public static func trainingLoss(model: LlamaModel, batch: TokenBatch, targets: [Int32]) throws -> Tensor {
        try model.moeTrainingLoss(batch: batch, targets: targets)
    }
}
