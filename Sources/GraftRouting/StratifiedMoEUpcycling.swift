import Foundation
import GraftModels
import GraftTensor

/// Settings of ``StratifiedMoE/upcycle(_:options:)``.
public struct StratifiedMoEOptions: Sendable {
    /// Experts per stratum: stratum 0's are copies of the layer's FFN, the later strata's are new experts.
    public var strata = [2, 2]
    /// Neurons of each new expert (strata ≥ 1); nil: a quarter of the FFN's.
    public var newExpertSize: Int?
    /// Experts each token runs per stratum pass.
    public var topK = 2
    /// The decoder layers made stratified, ascending; nil: every layer.
    public var layers: [Int]?
    /// Standard deviation of the routers' weights.
    public var routerStd: Float = 0.02
    /// Added to stratum 0's router bias for stratum 0's experts, so tokens start on the FFN's copies.
    public var firstStratumBias: Float = 4
    /// Weight of the Switch load-balancing loss per stratum in training.
    public var balanceLossWeight: Float = 0.01
    /// Seeds the routers and the new experts' neurons.
    public var seed: UInt64 = 0
    /// Defaults: strata of 2 and 2 experts, top-2, every layer.
    public init() {}
}

extension StratifiedMoE {
    /// Replaces the feed-forward block of each layer in `options.layers` by a stratified MoE made from it (MoE
    /// blocks are removed first) and returns the new blocks. Stratum 0's experts are copies of the layer's FFN and
    /// every later stratum's are new experts over a random subset of its neurons (`gate`/`up` rows copied) whose
    /// `down` starts at zero, so the new capacity adds nothing until trained. With top-k ≥ 2 over at least k FFN
    /// copies, tokens start on the copies (renormalized weights sum to 1) and the block computes the dense FFN.
    /// Throws, leaving the model unchanged, when a setting does not fit.
    @discardableResult
    public static func upcycle(_ model: LlamaModel, options: StratifiedMoEOptions) throws -> [StratifiedMoE] {
        let count = model.layers.count, ff = model.config.intermediateSize, h = model.config.hiddenSize
        let layers = options.layers ?? Array(0..<count)
        try TokenDispatch.checkLayers(layers, count: count, method: "stratified MoE")
        let size = options.newExpertSize ?? max(1, ff / 4)
        let e = options.strata.reduce(0, +)
        guard options.strata.count >= 1, options.strata.allSatisfy({ $0 >= 1 }), (1...ff).contains(size),
              (1...e).contains(options.topK) else {
            throw GraftError.invalid("stratified MoE: strata \(options.strata) must be ≥ 1 experts each, the new expert size \(size) in 1...\(ff), top_k \(options.topK) in 1...\(e)")
        }
        guard options.routerStd.isFinite, options.routerStd >= 0, options.firstStratumBias.isFinite,
              options.balanceLossWeight.isFinite, options.balanceLossWeight >= 0 else {
            throw GraftError.invalid("stratified MoE: router std \(options.routerStd), first-stratum bias \(options.firstStratumBias) and balance loss weight \(options.balanceLossWeight) must be finite (std and weight ≥ 0)")
        }
        try model.checkNoFeedForwardAdapters()
        var rng = GraftRNG(seed: options.seed)
        var made: [(Int, StratifiedMoE)] = []
        let first = options.strata[0]
        for i in layers.sorted() {
            let layer = model.layers[i]
            let identity = (0..<ff).map(Int32.init)
            let (g, u, d) = MoEfication.expertWeights(layer: layer, partition: identity, sizes: [ff])
            let gate = Tensor(zeros: [e, ff, h]), up = Tensor(zeros: [e, ff, h]), down = Tensor(zeros: [e, h, ff])
            for x in 0..<e {
                if x < first {
                    (gate.pointer + x * ff * h).update(from: g.pointer, count: ff * h)
                    (up.pointer + x * ff * h).update(from: u.pointer, count: ff * h)
                    (down.pointer + x * h * ff).update(from: d.pointer, count: h * ff)
                } else {
                    // A random subset of the FFN's neurons; `down` stays zero.
                    var neurons = Array(0..<ff)
                    for j in 0..<size { neurons.swapAt(j, j + Int(rng.next() % UInt64(ff - j))) }
                    for (r, n) in neurons.prefix(size).enumerated() {
                        (gate.pointer + (x * ff + r) * h).update(from: g.pointer + n * h, count: h)
                        (up.pointer + (x * ff + r) * h).update(from: u.pointer + n * h, count: h)
                    }
                }
            }
            let routers = options.strata.indices.map { s -> (weight: Tensor, bias: Tensor) in
                let bias = (0..<e).map { s == 0 && $0 < first ? options.firstStratumBias : 0 }
                return (Tensor.randomNormal([e, h], std: options.routerStd, rng: &rng), Tensor(shape: [e], values: bias))
            }
            let norms = (1..<options.strata.count).map { _ in Tensor(shape: [h], values: layer.postAttentionNorm.weight.scalars) }
            let block = try StratifiedMoE(path: "model.layers.\(i).mlp", strata: options.strata,
                                          expertSizes: (0..<e).map { $0 < first ? ff : size }, gate: gate, up: up, down: down,
                                          routers: routers, norms: norms, normEps: layer.postAttentionNorm.eps, topK: options.topK)
            block.balanceLossWeight = options.balanceLossWeight
            made.append((i, block))
        }
        model.removeMoEBlocks()
        for (i, b) in made { model.layers[i].feedForwardOverride = b }
        return made.map(\.1)
    }

    /// The stratified blocks of `model`, in layer order.
    public static func blocks(of model: LlamaModel) -> [StratifiedMoE] { model.layers.compactMap { $0.feedForwardOverride as? StratifiedMoE } }

    /// Every tensor of every stratified block (routers, norms, and the experts unless `experts` is false), marked
    /// as requiring gradients.
    public static func trainableParameters(of model: LlamaModel, experts: Bool = true) -> [Tensor] {
        blocks(of: model).flatMap { b in experts ? b.parameters : b.routers.flatMap { [$0.weight, $0.bias] } + b.norms }
            .map { $0.requiringGrad() }
    }

    /// The training objective of one batch: the next-token loss plus every stratified block's balance loss.
    public static func trainingLoss(model: LlamaModel, batch: TokenBatch, targets: [Int32]) throws -> Tensor {
        var loss = try model.nextTokenLoss(batch: batch, targets: targets, method: "stratified MoE")
        for b in blocks(of: model) { if let aux = b.lastAuxiliaryLoss { loss = loss + aux } }
        return loss
    }
}
