import Foundation
import GraftModels
import GraftTensor

/// Settings of ``WideNet``.
public struct WideNetOptions: Sendable {
    /// Consecutive layers that share one MoE feed-forward block.
    public var groupSize = 2
    /// The decoder layers grouped, ascending and consecutive, a multiple of ``groupSize``; nil: every layer.
    public var layers: [Int]?
    /// Experts (FFNs of the group) each token runs.
    public var topK = 1
    /// The router's fit target: the own layer's FFN scores 1, the others this (lower: a more confident router).
    public var otherLayerTarget: Float = 0.05
    /// The ridge penalty of the router fit, relative to the largest squared singular value of its inputs.
    public var ridge: Float = 1e-3
    /// Calibration tokens per layer for the router fit.
    public var maxTokens = 1024
    /// Weight of the Switch load-balancing loss in training passes.
    public var balanceLossWeight: Float = 0
    /// Defaults: groups of 2, top-1, every layer.
    public init() {}
}

/// WideNet (Xue et al., 2022, "Go Wider Instead of Deeper", seed #86): consecutive layers share one MoE
/// feed-forward block (one router, one set of experts) while every layer keeps its own normalization layers, which
/// is what lets the shared router tell the layers' tokens apart.
///
/// Graft builds it from a dense decoder: a group's experts are its layers' own FFNs (so each layer may run any FFN
/// of its group: wider, at the same FLOPs for top-1), weighed at top-1 by the router probability (Switch's gate,
/// so the router trains through the output) and above by the probabilities renormalized over the chosen ones; the
/// shared router is fitted (ridge regression on the layers' FFN inputs from calibration text) to send a
/// layer's tokens to its own FFN, so the model starts close to the dense one. Training then tunes the shared routers
/// and the per-layer norms (``trainableParameters(of:experts:)``), optionally the experts. Each layer of a group
/// holds its own ``MoEFeedForward`` over the same tensors, so router statistics stay per layer while gradients from
/// every layer of the group accumulate in the shared weights. Departure: the paper also shares attention and trains
/// from scratch; a pretrained decoder's attention stays per layer here (one layer's attention in its neighbours'
/// place breaks the model), so no parameters are saved by sharing: the gain sought is width.
public enum WideNet {
    /// Replaces the feed-forward blocks of the grouped layers of `model` by the groups' shared MoE blocks, fitted
    /// on `sequences`, and returns the groups. Throws, leaving the model unchanged, when a setting does not fit.
    @discardableResult
    public static func apply(to model: LlamaModel, sequences: [[Int32]], options: WideNetOptions) throws -> [[Int]] {
        let groups = try layerGroups(count: model.layers.count, options: options)
        guard options.otherLayerTarget > 0, options.otherLayerTarget < 1, options.ridge.isFinite, options.ridge >= 0,
              options.balanceLossWeight.isFinite, options.balanceLossWeight >= 0 else {
            throw GraftError.invalid("WideNet: other-layer target \(options.otherLayerTarget) must be in (0, 1), ridge \(options.ridge) and balance loss weight \(options.balanceLossWeight) finite and ≥ 0")
        }
        try model.checkNoFeedForwardAdapters()
        model.removeMoEBlocks()
        let inputs = try MoEfication.collectFeedForwardInputs(model: model, sequences: sequences, maxTokens: options.maxTokens)
        var routers: [(Tensor, Tensor)] = []
        for group in groups {
            let g = group.count
            // Every layer's FFN inputs, each targeting its own layer's expert.
            let x = ExpertReuse.stacked(group.map { inputs[$0] })
            var target: [Float] = []
            for (j, layer) in group.enumerated() {
                for _ in 0..<inputs[layer].rows { target += (0..<g).map { $0 == j ? 1 : options.otherLayerTarget } }
            }
            routers.append(try MoEfication.fitRouter(inputs: x, importance: Tensor(shape: [x.rows, g], values: target),
                                                     rows: (0..<Int32(x.rows)).map { $0 }, ridge: options.ridge,
                                                     what: "WideNet router of layers \(group)"))
        }
        try install(on: model, groups: groups, routers: routers, topK: options.topK, balanceLossWeight: options.balanceLossWeight)
        return groups
    }

    /// Makes each group of `model`'s layers share one MoE block over the group's FFNs with router `routers[i]`.
    static func install(on model: LlamaModel, groups: [[Int]], routers: [(Tensor, Tensor)], topK: Int,
                        balanceLossWeight: Float) throws {
        let ff = model.config.intermediateSize
        let identity = (0..<ff).map(Int32.init)
        var made: [(layer: Int, block: MoEFeedForward)] = []
        for (group, (w, b)) in zip(groups, routers) {
            let weights = group.map { MoEfication.expertWeights(layer: model.layers[$0], partition: identity, sizes: [ff]) }
            let gate = ExpertReuse.stacked(weights.map(\.0)), up = ExpertReuse.stacked(weights.map(\.1))
            let down = ExpertReuse.stacked(weights.map(\.2))
            for layer in group {
                let block = try MoEFeedForward(path: "model.layers.\(layer).mlp", partition: Array(repeating: identity, count: group.count).flatMap { $0 },
                                               gate: gate, up: up, down: down, routerWeight: w, routerBias: b, topK: topK)
                block.combine = topK == 1 ? .probability : .normalizedProbability
                block.balanceLossWeight = balanceLossWeight
                block.expertLayers = group
                block.sharedByLayers = group
                made.append((layer, block))
            }
        }
        for (i, b) in made { model.layers[i].feedForwardOverride = b }
    }

    /// The groups of `options.layers` (every layer when nil) for a model of `count` layers; throws naming the fault.
    static func layerGroups(count: Int, options: WideNetOptions) throws -> [[Int]] {
        let layers = options.layers ?? Array(0..<count)
        try TokenDispatch.checkLayers(layers, count: count, method: "WideNet")
        guard options.groupSize >= 2, layers.count % options.groupSize == 0 else {
            throw GraftError.invalid("WideNet: group size \(options.groupSize) must be ≥ 2 and divide the \(layers.count) layers grouped")
        }
        guard zip(layers, layers.dropFirst()).allSatisfy({ $1 == $0 + 1 }) else {
            throw GraftError.invalid("WideNet: layers \(layers) must be consecutive")
        }
        guard (1...options.groupSize).contains(options.topK) else {
            throw GraftError.invalid("WideNet: top_k \(options.topK) must be in 1...\(options.groupSize)")
        }
        return stride(from: 0, to: layers.count, by: options.groupSize).map { Array(layers[$0..<($0 + options.groupSize)]) }
    }

    /// The WideNet blocks of `model` by layer (nil for a layer outside every group).
    public static func blocks(of model: LlamaModel) -> [MoEFeedForward?] {
        model.layers.map { layer in (layer.feedForwardOverride as? MoEFeedForward).flatMap { $0.sharedByLayers == nil ? nil : $0 } }
    }

    /// What trains: each group's shared router (once), every grouped layer's two norms, and the shared experts when
    /// `experts` is set; each is marked as requiring gradients.
    public static func trainableParameters(of model: LlamaModel, experts: Bool = false) -> [Tensor] {
        var seen = Set<ObjectIdentifier>(), out: [Tensor] = []
        for (layer, block) in zip(model.layers, blocks(of: model)) {
            guard let block else { continue }
            var tensors = [block.routerWeight, block.routerBias, layer.inputNorm.weight, layer.postAttentionNorm.weight]
            if experts { tensors += [block.gateWeight, block.upWeight, block.downWeight] }
            for t in tensors where seen.insert(ObjectIdentifier(t)).inserted { out.append(t.requiringGrad()) }
        }
        return out
    }

    /// Over the grouped layers' router statistics, the fraction of dispatched tokens that ran their own layer's FFN.
    public static func ownLayerShare(of model: LlamaModel) -> Double {
        var own = 0, total = 0
        for (i, block) in blocks(of: model).enumerated() {
            guard let block, let layers = block.expertLayers else { continue }
            for (e, n) in block.statistics.dispatchedTokens.enumerated() {
                total += n
                if layers[e] == i { own += n }
            }
        }
        return total > 0 ? Double(own) / Double(total) : 0
    }
}
