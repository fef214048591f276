import Foundation
import GraftModels
import GraftTensor

/// Settings of ``DyT``.
public struct DyTOptions: Sendable {
    /// The decoder layers given a dispatcher and adapter, ascending; nil: every layer.
    public var layers: [Int]?
    /// The adapters' bottleneck width.
    public var adapterDim = 16
    /// Adapter experts per layer: 1 is a plain bottleneck adapter, more the paper's MoE adapter (experts mixed per
    /// token by a softmax router).
    public var adapterExperts = 1
    /// The FFN activation rate the rate loss pulls toward (the fraction of tokens that run the FFN).
    public var targetRate: Float = 0.5
    /// Weight of the rate loss `(rate − target)²`.
    public var rateWeight: Float = 1
    /// The dispatchers' initial bias: a large one runs every token through the FFN (the dense model) until trained.
    public var initialBias: Float = 3
    /// Temperature of the relaxed (sigmoid) gate.
    public var temperature: Float = 1
    /// Seeds the new weights and the Gumbel noise.
    public var seed: UInt64 = 0
    /// Defaults: every layer, adapter width 16, one expert, target rate 0.5, bias 3.
    public init() {}

    /// Throws naming the first setting out of range for a decoder of `layerCount` layers.
    func validate(layerCount: Int) throws {
        try TokenDispatch.checkLayers(layers, count: layerCount, method: "DyT")
        guard adapterDim >= 1, adapterExperts >= 1 else {
            throw GraftError.invalid("DyT: adapter_dim \(adapterDim) and adapter_experts \(adapterExperts) must be ≥ 1")
        }
        guard (0...1).contains(targetRate), rateWeight >= 0, rateWeight.isFinite, initialBias.isFinite,
              temperature > 0, temperature.isFinite else {
            throw GraftError.invalid("DyT: target_rate \(targetRate) must be in [0, 1], rate weight \(rateWeight) ≥ 0, temperature \(temperature) > 0")
        }
    }
}

/// DyT (Dynamic Tuning, Zhao et al., 2024) on a decoder's feed-forward blocks: a per-layer token dispatcher (a
/// linear score `x w + b` on the block's input) sends each token through the frozen FFN or past it, while a
/// trainable bottleneck adapter (or the paper's MoE adapter) runs on every token beside it:
/// `y = m · FFN(x) + Adapter(x)`, `m ∈ {0, 1}`. Tokens that skip save the FFN's FLOPs; attention, and so the KV
/// cache, is untouched. Training uses the straight-through Gumbel-sigmoid gate and the rate loss
/// `(mean m − target)²`; inference runs the FFN only on the dispatched tokens. Departure: the paper dispatches
/// ViT tokens and distils from the full model; here the tokens are a decoder's and the loss is the LM loss.
public final class DyTFeedForward: Module, TokenDispatchBlock {
    /// `model.layers.N.mlp`.
    public let path: String
    /// The decoder layer whose dense FFN the dispatched tokens run.
    unowned let layer: LlamaDecoderLayer
    /// `[1, hidden]` and `[1]`: the dispatcher's score `x wᵀ + b` (> 0 runs the FFN).
    public let dispatcherWeight: Tensor, dispatcherBias: Tensor
    /// Per expert `[d, hidden]` and `[hidden, d]` (zero at initialisation): `up · gelu(down · x)`.
    public let adapterDown: [Tensor], adapterUp: [Tensor]
    /// `[E, hidden]`: the adapter experts' router (nil for one expert).
    public let adapterRouter: Tensor?
    /// How the dispatcher's scores become FFN choices.
    public var mode: TokenDispatchMode = .hard
    /// Temperature of the relaxed gate `σ(score / τ)`.
    public var temperature: Float
    /// Gumbel noise on the scores of a straight-through pass (scale 1; 0: none).
    public var explorationNoise: Float = 1
    /// The straight-through mask `[T, 1]` of the last pass with gradients on (its mean is the activation rate, its
    /// gradient the relaxed gate's); nil otherwise.
    public private(set) var lastMask: Tensor?
    /// What the dispatcher chose since the last reset: choice 0 skips the FFN, 1 runs it (`meanDepth` is the
    /// activation rate).
    public var statistics: RouterLayerStatistics
    private var rng: GraftRNG

    /// New weights for `layer` (dispatcher `w ~ N(0, 1/hidden)`, bias `initialBias`; adapter `down ~ N(0, 1/hidden)`,
    /// `up = 0`, router `N(0, 0.02²)`): the block is the dense FFN until trained.
    init(path: String, layer: LlamaDecoderLayer, hidden: Int, options: DyTOptions, rng: inout GraftRNG) {
        self.path = path
        self.layer = layer
        let std = 1 / Float(hidden).squareRoot()
        dispatcherWeight = Tensor.randomNormal([1, hidden], std: std, rng: &rng)
        dispatcherBias = Tensor(shape: [1], values: [options.initialBias])
        adapterDown = (0..<options.adapterExperts).map { _ in Tensor.randomNormal([options.adapterDim, hidden], std: std, rng: &rng) }
        adapterUp = (0..<options.adapterExperts).map { _ in Tensor(zeros: [hidden, options.adapterDim]) }
        adapterRouter = options.adapterExperts > 1 ? Tensor.randomNormal([options.adapterExperts, hidden], std: 0.02, rng: &rng) : nil
        temperature = options.temperature
        statistics = RouterLayerStatistics(path: path + ".dispatcher", executionsPerChoice: [0, 1])
        self.rng = GraftRNG(seed: rng.next())
        super.init(typeName: "DyTFeedForward")
        register(parameter: "dispatcher.weight", dispatcherWeight)
        register(parameter: "dispatcher.bias", dispatcherBias)
        for e in adapterDown.indices {
            register(parameter: "adapter.\(e).down.weight", adapterDown[e])
            register(parameter: "adapter.\(e).up.weight", adapterUp[e])
        }
        if let adapterRouter { register(parameter: "adapter.router.weight", adapterRouter) }
    }

    /// Empty statistics for the dispatcher: choice 0 skips the FFN, 1 runs it.
    public func emptyStatistics() -> RouterLayerStatistics {
        RouterLayerStatistics(path: path + ".dispatcher", executionsPerChoice: [0, 1])
    }

    /// Every trainable tensor: the dispatcher, the adapter experts and their router.
    public var trainableTensors: [Tensor] {
        [dispatcherWeight, dispatcherBias] + adapterDown + adapterUp + (adapterRouter.map { [$0] } ?? [])
    }

    /// The adapter's output for `x` `[T, hidden]`: one bottleneck, or the experts weighed by their router's softmax.
    public func adapterOutput(_ x: Tensor) -> Tensor {
        func expert(_ e: Int) -> Tensor { linear(gelu(linear(x, adapterDown[e])), adapterUp[e]) }
        guard let adapterRouter else { return expert(0) }
        let weights = softmax(linear(x, adapterRouter))
        var y = expert(0) * weights.slice(dim: 1, 0..<1)
        for e in 1..<adapterDown.count { y = y + expert(e) * weights.slice(dim: 1, e..<(e + 1)) }
        return y
    }

    /// `m · FFN(x) + Adapter(x)` for `x` `[..., hidden]`; in hard mode the FFN runs on the dispatched tokens only.
    public func forward(_ x: Tensor) -> Tensor {
        let shape = x.shape, h = shape.last ?? 0
        let flat = x.reshaped([x.count / max(h, 1), h])
        let t = flat.rows
        let scores = linear(flat, dispatcherWeight, dispatcherBias)
        let ps = scores.pointer
        var noisy = [Float](repeating: 0, count: t)
        for i in 0..<t {
            // A dispatcher that produced NaN runs the FFN (the dense model's choice).
            noisy[i] = ps[i].isNaN ? 1 : ps[i] + (mode == .straightThrough && explorationNoise > 0
                                                  ? explorationNoise * (TokenDispatch.gumbel(&rng) - TokenDispatch.gumbel(&rng)) : 0)
        }
        let chosen = noisy.map { $0 > 0 ? 1 : 0 }
        let relaxed = sigmoid(scores * (1 / temperature))
        recordStatistics(relaxed, chosen)
        let ffn: Tensor, mask: Tensor?
        switch mode {
        case .hard:
            let rows = chosen.indices.filter { chosen[$0] == 1 }
            ffn = TokenDispatch.onRows(flat, rows, width: h) { layer.denseFeedForward($0) }
            mask = nil
        case .straightThrough:
            let hard = Tensor(shape: [t, 1], values: chosen.map(Float.init))
            // The noisy score's relaxation, so that the gradient matches the sampled choice.
            let noise = Tensor(shape: [t, 1], values: zip(noisy, (0..<t).map { ps[$0] }).map { $0.isFinite && $1.isFinite ? $0 - $1 : 0 })
            let m = TokenDispatch.straightThrough(hard: hard, soft: sigmoid((scores + noise) * (1 / temperature)))
            ffn = layer.denseFeedForward(flat) * m
            mask = m
        case .soft:
            ffn = layer.denseFeedForward(flat) * relaxed
            mask = relaxed
        }
        lastMask = GradMode.isEnabled ? mask : nil
        return (ffn + adapterOutput(flat)).reshaped(shape)
    }

    /// Adds one pass to the statistics: per token its relaxed gate and choice.
    private func recordStatistics(_ relaxed: Tensor, _ chosen: [Int]) {
        let p = relaxed.pointer
        let probabilities = (0..<chosen.count).flatMap { [1 - p[$0], p[$0]] }
        statistics.recordRoutes(probabilities: probabilities, chosen: chosen, tokens: [Int](repeating: 1, count: chosen.count))
    }

    /// FLOPs per token of the block when a fraction `rate` of tokens runs the FFN of `intermediate` neurons.
    public func flopsPerToken(rate: Double, intermediate: Int) -> Double {
        let h = Double(dispatcherWeight.shape[1]), d = Double(adapterDown[0].shape[0]), e = Double(adapterDown.count)
        return 2 * h + rate * 6 * h * Double(intermediate) + e * 4 * h * d + (e > 1 ? 2 * h * e : 0)
    }
}

/// DyT on a ``LlamaModel``: installing the blocks, the training loss, the activation rate.
public enum DyT {
    /// Gives each layer in `options.layers` of `model` a ``DyTFeedForward`` (replacing any feed-forward override:
    /// an MoE block or earlier DyT blocks are removed first) and returns the blocks, in layer order.
    @discardableResult
    public static func apply(to model: LlamaModel, options: DyTOptions) throws -> [DyTFeedForward] {
        try options.validate(layerCount: model.layers.count)
        var rng = GraftRNG(seed: options.seed)
        let h = model.config.hiddenSize
        model.removeMoEBlocks()
        return (options.layers ?? Array(model.layers.indices)).sorted().map { i in
            let block = DyTFeedForward(path: "model.layers.\(i).mlp", layer: model.layers[i], hidden: h, options: options, rng: &rng)
            model.layers[i].feedForwardOverride = block
            return block
        }
    }

    /// The DyT blocks of `model`, in layer order.
    public static func blocks(of model: LlamaModel) -> [DyTFeedForward] { model.tokenDispatchBlocks(DyTFeedForward.self) }

    /// Sets every block's mode.
    public static func setMode(_ mode: TokenDispatchMode, of model: LlamaModel) { blocks(of: model).setMode(mode) }

    /// The trainable tensors of every block, marked as requiring gradients.
    public static func trainableParameters(of model: LlamaModel) -> [Tensor] { blocks(of: model).markedTrainable }

    /// The training objective of one batch: the mean next-token cross-entropy over `targets` (`[batch · length]`,
    /// -100 ignored) plus `rateWeight · (rate − targetRate)²`, the rate the mean over blocks and tokens of the
    /// straight-through masks. Returns the loss (recorded for autograd) and the hard activation rate.
    public static func trainingLoss(model: LlamaModel, batch: TokenBatch, targets: [Int32], targetRate: Float,
                                    rateWeight: Float) throws -> (loss: Tensor, rate: Double) {
        let blocks = blocks(of: model)
        guard !blocks.isEmpty else { throw GraftError(.state, "DyT: the model has no DyT block") }
        var loss = try model.nextTokenLoss(batch: batch, targets: targets, method: "DyT")
        let masks = blocks.compactMap(\.lastMask)
        guard masks.count == blocks.count,
              let (rate, penalty) = TokenDispatch.targetPenalty(masks.map(mean), target: targetRate, weight: rateWeight) else {
            return (loss, .nan)
        }
        if let penalty { loss = loss + penalty }
        return (loss, Double(rate.item))
    }

    /// The fraction of routed tokens that ran the FFN, over every block's statistics (0 before any token).
    public static func activationRate(of model: LlamaModel) -> Double {
        let stats = blocks(of: model).map(\.statistics)
        let tokens = stats.reduce(0) { $0 + $1.tokens }
        return tokens > 0 ? Double(stats.reduce(0) { $0 + $1.dispatchedTokens[1] }) / Double(tokens) : 0
    }

    /// Clears every block's statistics.
    public static func resetStatistics(of model: LlamaModel) { blocks(of: model).resetStatistics() }
}
