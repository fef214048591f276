import Foundation
import GraftModels
import GraftTensor

/// Settings of ``DuoLLM``.
public struct DuoLLMOptions: Sendable {
    /// The decoder layers given a router and a small FFN, ascending; nil: every layer.
    public var layers: [Int]?
    /// Neurons of each small FFN (the dense FFN's most important ones on the calibration text).
    public var smallSize = 256
    /// The mean compute per token (skip 0, small `smallSize / intermediate`, big 1, averaged over layers and
    /// tokens) the compute loss pulls toward.
    public var targetCompute: Float = 0.5
    /// Weight of the compute loss `(compute − target)²`.
    public var computeWeight: Float = 1
    /// The big choice's initial router bias (the others start at 0): a large one runs the dense FFN for every
    /// token (the dense model) until trained.
    public var initialBias: Float = 3
    /// Temperature of the relaxed (softmax) choice.
    public var temperature: Float = 1
    /// Calibration tokens read to rank the neurons.
    public var maxTokens = 1024
    /// Seeds the routers and the Gumbel noise.
    public var seed: UInt64 = 0
    /// Defaults: every layer, 256 neurons, target compute 0.5.
    public init() {}

    /// Throws naming the first setting out of range for a decoder of `layerCount` layers and FFN width `ff`.
    func validate(layerCount: Int, intermediate ff: Int) throws {
        try TokenDispatch.checkLayers(layers, count: layerCount, method: "Duo-LLM")
        guard (1..<ff).contains(smallSize) else {
            throw GraftError.invalid("Duo-LLM: small_size \(smallSize) must be in 1..<\(ff) (the intermediate size)")
        }
        guard (0...1).contains(targetCompute), computeWeight >= 0, computeWeight.isFinite, initialBias.isFinite,
              temperature > 0, temperature.isFinite else {
            throw GraftError.invalid("Duo-LLM: target_compute \(targetCompute) must be in [0, 1], compute weight \(computeWeight) ≥ 0, temperature \(temperature) > 0")
        }
    }
}

/// Duo-LLM (Alizadeh et al., 2024) on a decoder's feed-forward blocks: each layer's FFN gets a small companion FFN
/// and a per-token router choosing to skip the FFN, run the small one or run the big (dense) one. The small FFN
/// starts as the dense FFN restricted to its `s` most important neurons (mean `|activation| · ‖down column‖` on
/// calibration text) and trains with the routers; the dense FFN stays frozen. Training uses the straight-through
/// Gumbel-softmax choice and the compute loss `(mean cost − target)²`; inference runs each module only on the
/// tokens that chose it. Attention always runs, so the KV cache is untouched. Departure: the paper trains the
/// small modules from scratch and studies oracle routes; here they are slices of the dense FFN, and the routers
/// learn from the LM loss.
public final class DuoLLMFeedForward: Module, TokenDispatchBlock {
    /// `model.layers.N.mlp`.
    public let path: String
    /// The decoder layer whose dense FFN is the big module.
    unowned let layer: LlamaDecoderLayer
    /// `[3, hidden]` and `[3]`: the router's scores for skip, small, big.
    public let routerWeight: Tensor, routerBias: Tensor
    /// The small FFN: `[s, hidden]`, `[s, hidden]`, `[hidden, s]`.
    public let smallGate: Tensor, smallUp: Tensor, smallDown: Tensor
    /// The compute of each choice relative to the dense FFN: skip 0, small `s / intermediate`, big 1.
    public let costs: [Float]
    /// How the router's scores become choices.
    public var mode: TokenDispatchMode = .hard
    /// Temperature of the relaxed choice `softmax(scores / τ)`.
    public var temperature: Float
    /// Gumbel noise on the scores of a straight-through pass (scale 1; 0: none).
    public var explorationNoise: Float = 1
    /// `[T, 3]`: the (straight-through or soft) choice weights of the last pass with gradients on; nil otherwise.
    public private(set) var lastChoice: Tensor?
    /// What the router chose since the last reset: choices skip, small, big (`executionsPerChoice` `[0, 1, 1]`:
    /// `meanDepth` is the fraction of tokens that ran an FFN).
    public var statistics: RouterLayerStatistics
    private var rng: GraftRNG

    /// A block for `layer` with the small FFN's weights (shapes above) and a new router (weights `N(0, 0.02²)`,
    /// big's bias `options.initialBias`).
    init(path: String, layer: LlamaDecoderLayer, small: (Tensor, Tensor, Tensor), intermediate: Int, options: DuoLLMOptions,
         rng: inout GraftRNG) {
        self.path = path
        self.layer = layer
        let h = small.0.shape[1], s = small.0.shape[0]
        routerWeight = Tensor.randomNormal([3, h], std: 0.02, rng: &rng)
        routerBias = Tensor(shape: [3], values: [0, 0, options.initialBias])
        (smallGate, smallUp, smallDown) = small
        costs = [0, Float(s) / Float(intermediate), 1]
        temperature = options.temperature
        statistics = RouterLayerStatistics(path: path + ".router", executionsPerChoice: [0, 1, 1])
        self.rng = GraftRNG(seed: rng.next())
        super.init(typeName: "DuoLLMFeedForward")
        register(parameter: "router.weight", routerWeight)
        register(parameter: "router.bias", routerBias)
        register(parameter: "small.gate_proj", smallGate)
        register(parameter: "small.up_proj", smallUp)
        register(parameter: "small.down_proj", smallDown)
    }

    /// Empty statistics for the router: choices skip, small, big.
    public func emptyStatistics() -> RouterLayerStatistics {
        RouterLayerStatistics(path: path + ".router", executionsPerChoice: [0, 1, 1])
    }

    /// Every trainable tensor: the router and the small FFN.
    public var trainableTensors: [Tensor] { [routerWeight, routerBias, smallGate, smallUp, smallDown] }

    /// The small FFN on `x` `[T, hidden]`.
    public func smallFeedForward(_ x: Tensor) -> Tensor { linear(swiglu(linear(x, smallGate), linear(x, smallUp)), smallDown) }

    /// The chosen module's output for each token of `x` (`[..., hidden]`; zero where the FFN is skipped).
    public func forward(_ x: Tensor) -> Tensor {
        let shape = x.shape, h = shape.last ?? 0
        let flat = x.reshaped([x.count / max(h, 1), h])
        let t = flat.rows
        let scores = linear(flat, routerWeight, routerBias)
        let ps = scores.pointer
        var noisy = [Float](repeating: 0, count: t * 3), chosen = [Int](repeating: 2, count: t)
        for i in 0..<t {
            var best = 2, bestValue = -Float.infinity
            for j in 0..<3 {
                let v = ps[i * 3 + j] + (mode == .straightThrough && explorationNoise > 0 ? explorationNoise * TokenDispatch.gumbel(&rng) : 0)
                noisy[i * 3 + j] = v.isFinite ? v : 0
                // A router that produced NaN runs the big FFN (the dense model's choice).
                if v.isNaN { best = 2; break }
                if v > bestValue { best = j; bestValue = v }
            }
            chosen[i] = best
        }
        let probs = softmax(scores * (1 / temperature))
        statistics.recordRoutes(probabilities: probs.scalars, chosen: chosen, tokens: [Int](repeating: 1, count: t))
        let y: Tensor, weights: Tensor?
        switch mode {
        case .hard:
            y = TokenDispatch.onRows(flat, chosen.indices.filter { chosen[$0] == 1 }, width: h, smallFeedForward)
                + TokenDispatch.onRows(flat, chosen.indices.filter { chosen[$0] == 2 }, width: h) { layer.denseFeedForward($0) }
            weights = nil
        case .straightThrough, .soft:
            let w: Tensor
            if mode == .soft {
                w = probs
            } else {
                var onehot = [Float](repeating: 0, count: t * 3)
                for i in 0..<t { onehot[i * 3 + chosen[i]] = 1 }
                let noise = Tensor(shape: [t, 3], values: (0..<(t * 3)).map { ps[$0].isFinite ? noisy[$0] - ps[$0] : 0 })
                w = TokenDispatch.straightThrough(hard: Tensor(shape: [t, 3], values: onehot),
                                                  soft: softmax((scores + noise) * (1 / temperature)))
            }
            y = smallFeedForward(flat) * w.slice(dim: 1, 1..<2) + layer.denseFeedForward(flat) * w.slice(dim: 1, 2..<3)
            weights = w
        }
        lastChoice = GradMode.isEnabled ? weights : nil
        return y.reshaped(shape)
    }

    /// The mean compute per token (relative to the dense FFN) of the routes its statistics recorded.
    public var measuredCompute: Double {
        let s = statistics
        guard s.tokens > 0 else { return 0 }
        return zip(s.dispatchedTokens, costs).reduce(0.0) { $0 + Double($1.0) * Double($1.1) } / Double(s.tokens)
    }
}

/// Duo-LLM on a ``LlamaModel``: installing the blocks, the training loss, the compute.
public enum DuoLLM {
    /// Gives each layer in `options.layers` of `model` a ``DuoLLMFeedForward`` whose small FFN holds the layer's
    /// `options.smallSize` most important neurons on `sequences` (any feed-forward override is removed first);
    /// returns the blocks in layer order. On an error the model is left dense.
    @discardableResult
    public static func apply(to model: LlamaModel, sequences: [[Int32]], options: DuoLLMOptions,
                             progress: (String) -> Void = { _ in }) throws -> [DuoLLMFeedForward] {
        let ff = model.config.intermediateSize
        try options.validate(layerCount: model.layers.count, intermediate: ff)
        model.removeMoEBlocks()
        let inputs = try MoEfication.collectFeedForwardInputs(model: model, sequences: sequences, maxTokens: options.maxTokens) {
            progress("calibration: \($0) tokens")
        }
        var rng = GraftRNG(seed: options.seed)
        let blocks = (options.layers ?? Array(model.layers.indices)).sorted().map { i -> DuoLLMFeedForward in
            let layer = model.layers[i]
            let neurons = importantNeurons(layer: layer, inputs: inputs[i], count: options.smallSize)
            let (g, u, d) = MoEfication.expertWeights(layer: layer, partition: neurons, sizes: [options.smallSize])
            let s = options.smallSize, h = model.config.hiddenSize
            return DuoLLMFeedForward(path: "model.layers.\(i).mlp", layer: layer,
                                     small: (g.reshaped([s, h]), u.reshaped([s, h]), d.reshaped([h, s])),
                                     intermediate: ff, options: options, rng: &rng)
        }
        for b in blocks { b.layer.feedForwardOverride = b }
        return blocks
    }

    /// The `count` neurons of `layer`'s FFN with the largest mean `|silu(gate x) · up x| · ‖down column‖` over
    /// `inputs` `[N, hidden]`, ascending.
    public static func importantNeurons(layer: LlamaDecoderLayer, inputs x: Tensor, count: Int) -> [Int32] {
        let a = withNoGrad { swiglu(layer.gateProj.baseForward(x), layer.upProj.baseForward(x)) }
        let ff = a.lastDim, tokens = a.rows
        let (_, _, down) = MoEfication.expertWeights(layer: layer, partition: (0..<ff).map(Int32.init), sizes: [ff])
        let norms = MoEFeedForward.columnNorms(down)
        var score = [Float](repeating: 0, count: ff)
        for t in 0..<tokens { for i in 0..<ff { score[i] += abs(a.pointer[t * ff + i]) } }
        for i in 0..<ff { score[i] *= norms.pointer[i] }
        return (0..<ff).sorted { score[$0] > score[$1] }.prefix(count).sorted().map(Int32.init)
    }

    /// The Duo-LLM blocks of `model`, in layer order.
    public static func blocks(of model: LlamaModel) -> [DuoLLMFeedForward] { model.tokenDispatchBlocks(DuoLLMFeedForward.self) }

    /// Sets every block's mode.
    public static func setMode(_ mode: TokenDispatchMode, of model: LlamaModel) { blocks(of: model).setMode(mode) }

    /// The trainable tensors of every block, marked as requiring gradients.
    public static func trainableParameters(of model: LlamaModel) -> [Tensor] { blocks(of: model).markedTrainable }

    /// The training objective of one batch: the mean next-token cross-entropy over `targets` plus
    /// `computeWeight · (compute − targetCompute)²`, the compute the mean over blocks and tokens of each choice's
    /// weight times its cost. Returns the loss and the compute of the hard choices.
    public static func trainingLoss(model: LlamaModel, batch: TokenBatch, targets: [Int32], targetCompute: Float,
                                    computeWeight: Float) throws -> (loss: Tensor, compute: Double) {
        let blocks = blocks(of: model)
        guard !blocks.isEmpty else { throw GraftError(.state, "Duo-LLM: the model has no Duo-LLM block") }
        var loss = try model.nextTokenLoss(batch: batch, targets: targets, method: "Duo-LLM")
        let computes = blocks.compactMap { b in b.lastChoice.map { mean(matmul($0, Tensor(shape: [3, 1], values: b.costs))) } }
        guard computes.count == blocks.count,
              let (compute, penalty) = TokenDispatch.targetPenalty(computes, target: targetCompute, weight: computeWeight) else {
            return (loss, .nan)
        }
        if let penalty { loss = loss + penalty }
        return (loss, Double(compute.item))
    }

    /// The mean compute per token over every block's statistics, relative to the dense FFNs (0 before any token).
    public static func measuredCompute(of model: LlamaModel) -> Double {
        let blocks = blocks(of: model)
        return blocks.isEmpty ? 0 : blocks.map(\.measuredCompute).reduce(0, +) / Double(blocks.count)
    }

    /// Clears every block's statistics.
    public static func resetStatistics(of model: LlamaModel) { blocks(of: model).resetStatistics() }
}
