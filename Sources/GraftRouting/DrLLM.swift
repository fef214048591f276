import Foundation
import GraftModels
import GraftTensor

/// What a Dr.LLM router does with its layer for one sequence.
public enum DrLLMAction: Int, Sendable, CaseIterable {
    /// The layer is not run: its input goes on unchanged, and it writes no keys or values.
    case skip = 0
    /// The layer runs once (the dense model).
    case execute = 1
    /// The layer runs twice in a row, the second run on the first run's output.
    case twice = 2
}

/// How the routers' probabilities enter a pass.
public enum DrLLMMode: Sendable {
    /// Each sequence takes its router's most likely action (inference; no gradient reaches the routers).
    case hard
    /// Training: the forward pass is the hard route's exactly (with Gumbel noise of scale
    /// ``DrLLMRouting/explorationNoise`` on the logits), the backward pass the soft mixture's (straight-through).
    case straightThrough
    /// The layer's output is the probability-weighted sum of the three actions' outputs (for gradient checks).
    case soft
}

/// One layer's Dr.LLM router: a bottleneck MLP `R^h → R^b → R^3` (GELU between) over windowed mean pools of the
/// layer's input, whose logits are averaged over the windows (skip, execute, twice).
///
/// A sequence's `n` real tokens are cut into `min(W, n)` contiguous windows of near-equal size; each window's
/// mean hidden state, divided by its root mean square (a departure from the paper, which feeds the raw mean: it
/// keeps one learning rate right for every layer's scale), goes through the MLP.
public final class DrLLMRouter: Module {
    /// The router's path, `model.layers.N.router`.
    public let path: String
    /// `[b, h]` and `[b]`: the bottleneck projection.
    public let fc1Weight: Tensor, fc1Bias: Tensor
    /// `[3, b]` and `[3]`: the action logits.
    public let fc2Weight: Tensor, fc2Bias: Tensor
    /// What the router chose since the statistics were last reset (a depth router: choices run the layer 0, 1, 2
    /// times).
    public var statistics: RouterLayerStatistics
    private let ones: Tensor

    /// A router from its weights (shapes above); throws naming the tensor whose shape does not fit.
    public init(path: String, fc1Weight: Tensor, fc1Bias: Tensor, fc2Weight: Tensor, fc2Bias: Tensor) throws {
        guard fc1Weight.rank == 2, fc1Weight.shape[0] >= 1 else {
            throw GraftError.invalid("\(path): fc1.weight has shape \(fc1Weight.shape), expected [bottleneck, hidden]")
        }
        let b = fc1Weight.shape[0], h = fc1Weight.shape[1]
        for (name, t, shape) in [("fc1.bias", fc1Bias, [b]), ("fc2.weight", fc2Weight, [3, b]), ("fc2.bias", fc2Bias, [3])]
        where t.shape != shape {
            throw GraftError.invalid("\(path): \(name) has shape \(t.shape), expected \(shape)")
        }
        self.path = path
        self.fc1Weight = fc1Weight
        self.fc1Bias = fc1Bias
        self.fc2Weight = fc2Weight
        self.fc2Bias = fc2Bias
        ones = Tensor(shape: [h], values: [Float](repeating: 1, count: h))
        statistics = RouterLayerStatistics(path: path, executionsPerChoice: DrLLMAction.allCases.map(\.rawValue))
        super.init(typeName: "DrLLMRouter")
        register(parameter: "fc1.weight", fc1Weight)
        register(parameter: "fc1.bias", fc1Bias)
        register(parameter: "fc2.weight", fc2Weight)
        register(parameter: "fc2.bias", fc2Bias)
    }

    /// A new router for width `hidden`: `fc1` drawn N(0, 1/h), `fc2` N(0, 0.02²), and the execute logit's bias
    /// `executeBias`, so a new router runs every layer once (the dense model) until trained.
    public convenience init(path: String, hidden: Int, bottleneck: Int, executeBias: Float, rng: inout GraftRNG) throws {
        guard hidden >= 1, bottleneck >= 1 else {
            throw GraftError.invalid("\(path): router sizes must be positive, got hidden \(hidden), bottleneck \(bottleneck)")
        }
        try self.init(path: path,
                      fc1Weight: Tensor.randomNormal([bottleneck, hidden], std: 1 / Float(hidden).squareRoot(), rng: &rng),
                      fc1Bias: Tensor(zeros: [bottleneck]),
                      fc2Weight: Tensor.randomNormal([3, bottleneck], std: 0.02, rng: &rng),
                      fc2Bias: Tensor(shape: [3], values: [0, executeBias, 0]))
    }

    /// Width of the bottleneck.
    public var bottleneck: Int { fc1Weight.shape[0] }

    /// Per sequence, the action logits `[batch, 3]` for the layer input `x` `[batch, length, hidden]`, of which row
    /// `r`'s first `lengths[r]` tokens are real, pooled over `windows` windows. Recorded for autograd.
    public func logits(_ x: Tensor, lengths: [Int], windows: Int) -> Tensor {
        let b = x.shape[0], t = x.shape[1], h = x.shape[2]
        var spans: [(row: Int, start: Int, end: Int)] = []
        var perRow = [Int](repeating: 0, count: b)
        for r in 0..<b {
            let n = min(max(r < lengths.count ? lengths[r] : t, 1), t), w = min(max(windows, 1), n)
            perRow[r] = w
            for k in 0..<w { spans.append((r, k * n / w, (k + 1) * n / w)) }
        }
        var pool = [Float](repeating: 0, count: spans.count * b * t)
        var average = [Float](repeating: 0, count: b * spans.count)
        for (i, s) in spans.enumerated() {
            let scale = 1 / Float(s.end - s.start)
            for p in s.start..<s.end { pool[i * b * t + s.row * t + p] = scale }
            average[s.row * spans.count + i] = 1 / Float(perRow[s.row])
        }
        let pooled = matmul(Tensor(shape: [spans.count, b * t], values: pool), x.reshaped([b * t, h]))
        let hidden = gelu(linear(rmsNorm(pooled, weight: ones, eps: 1e-6), fc1Weight, fc1Bias))
        return matmul(Tensor(shape: [b, spans.count], values: average), linear(hidden, fc2Weight, fc2Bias))
    }
}

/// Dr.LLM (Heakl et al., 2025): a router per decoder layer of a frozen decoder chooses, per sequence, to skip the
/// layer, run it, or run it twice; the ``LlamaModel/depthPolicy`` that runs the layer stack so.
///
/// Routes are per sequence, as in the paper: each layer's router reads the windowed mean of that layer's input
/// over the sequence's real tokens. When generating, the route is decided on the prompt's pass and kept for every
/// decoded token (``KVCache/layerRoutes``), under the KV policy of ``LayerDepthPolicy``: a skipped layer holds no
/// keys or values for the sequence, and the second run of a repeated layer keeps its own.
///
/// The routers train with the base frozen, in one of two ways: supervised from searched routes, as the paper
/// (``DrLLMRouteSearch``; the paper's search is a Monte Carlo tree search, Graft's a greedy one), or by
/// straight-through estimation (``DrLLMMode/straightThrough``, a departure): the language model loss of the hard
/// route plus a compute penalty on the expected layer runs (``trainingLoss(model:batch:targets:computePenalty:)``).
public final class DrLLMRouting: Module, LayerDepthPolicy {
    /// One router per decoder layer.
    public let routers: [DrLLMRouter]
    /// Windows of the mean pooling (the paper's `W`).
    public let windows: Int
    /// Whether the routing runs the layer stack (disabled: the dense model).
    public var isEnabled = true
    /// How probabilities enter a pass (hard by default).
    public var mode: DrLLMMode = .hard
    /// When set, every sequence takes this route (per layer, the action's raw value) and the routers do not run.
    public var forcedRoute: [DrLLMAction]?
    /// Scale of the Gumbel noise added to the logits before the hard choice of a straight-through pass (0: none).
    public var explorationNoise: Float = 0
    /// Per sequence, the expected layer runs `Σ_l p_l(execute) + 2 p_l(twice)` `[batch]` of the last pass whose
    /// routers ran in straight-through or soft mode, recorded for autograd; nil otherwise.
    public private(set) var expectedRuns: Tensor?
    /// Per sequence, the route of the last pass.
    public private(set) var lastRoutes: [[DrLLMAction]] = []
    /// When set, each pass keeps every layer's input (``capturedInputs``; the supervised training reads them).
    public var capturesInputs = false
    /// Per layer, the input `[batch, length, hidden]` of the last pass while ``capturesInputs`` was set.
    public private(set) var capturedInputs: [Tensor] = []
    private var rng: GraftRNG

    /// Routers for `model`'s layers (see ``DrLLMRouter/init(path:hidden:bottleneck:executeBias:rng:)``).
    public init(model: LlamaModel, bottleneck: Int = 64, windows: Int = 8, executeBias: Float = 2, seed: UInt64 = 0) throws {
        guard windows >= 1 else { throw GraftError.invalid("Dr.LLM: windows must be ≥ 1, got \(windows)") }
        var rng = GraftRNG(seed: seed)
        var made: [DrLLMRouter] = []
        for i in 0..<model.layers.count {
            made.append(try DrLLMRouter(path: "model.layers.\(i).router", hidden: model.config.hiddenSize,
                                        bottleneck: bottleneck, executeBias: executeBias, rng: &rng))
        }
        routers = made
        self.windows = windows
        self.rng = rng
        super.init(typeName: "DrLLMRouting")
        register("routers", ModuleList.numbered(made))
    }

    /// Routing from routers already made (a saved routing).
    public init(routers: [DrLLMRouter], windows: Int, seed: UInt64 = 0) throws {
        guard windows >= 1, !routers.isEmpty else {
            throw GraftError.invalid("Dr.LLM: \(routers.count) routers and \(windows) windows; both must be ≥ 1")
        }
        self.routers = routers
        self.windows = windows
        rng = GraftRNG(seed: seed)
        super.init(typeName: "DrLLMRouting")
        register("routers", ModuleList.numbered(routers))
    }

    /// Layers run per routed token, summed over layers (the dense model's is the layer count).
    public var meanDepth: Double { routers.reduce(0) { $0 + $1.statistics.meanDepth } }

    /// Every router's statistics, in layer order.
    public var statistics: [RouterLayerStatistics] { routers.map(\.statistics) }

    /// Clears every router's statistics.
    public func resetStatistics() {
        for r in routers { r.statistics = RouterLayerStatistics(path: r.path, executionsPerChoice: DrLLMAction.allCases.map(\.rawValue)) }
    }

    /// Runs `layers` over `x` under the routers (or the forced route, or the route a continued cache holds).
    public func runLayers(_ x: Tensor, layers: [LlamaDecoderLayer], pass: LayerPass) throws -> Tensor {
        guard layers.count == routers.count else {
            throw GraftError.invalid("Dr.LLM: \(routers.count) routers for a stack of \(layers.count) layers")
        }
        if let forcedRoute, forcedRoute.count != layers.count {
            throw GraftError.invalid("Dr.LLM: the forced route has \(forcedRoute.count) actions for \(layers.count) layers")
        }
        guard x.rank == 3, pass.lengths.count == x.shape[0], pass.positions.count == x.shape[0] * x.shape[1] else {
            throw GraftError.invalid("Dr.LLM: a pass over \(x.shape) needs one length per row and one position per token, got \(pass.lengths.count) and \(pass.positions.count)")
        }
        let b = x.shape[0]
        let cache = pass.cache
        var stored: [DrLLMAction]?
        if let cache, cache.length > 0 {
            guard let route = cache.layerRoutes, route.count == layers.count else {
                throw GraftError(.state, "Dr.LLM: the KV cache continues a sequence without a route of \(layers.count) layers (it was filled without this routing)")
            }
            stored = try route.enumerated().map { i, v in
                guard let a = DrLLMAction(rawValue: v) else { throw GraftError(.state, "Dr.LLM: cached route entry \(i) is \(v)") }
                return a
            }
        }
        guard cache == nil || mode == .hard || stored != nil || forcedRoute != nil else {
            throw GraftError(.unsupported, "Dr.LLM: straight-through and soft routing are for training passes without a KV cache")
        }
        var h = x
        var routes = [[DrLLMAction]](repeating: [], count: b)
        var expected: Tensor?
        if capturesInputs { capturedInputs = [] }
        for (i, layer) in layers.enumerated() {
            if capturesInputs { capturedInputs.append(h.detached()) }
            var chosen: [DrLLMAction]
            var weights: Tensor?
            if let stored {
                chosen = [DrLLMAction](repeating: stored[i], count: b)
            } else if let forcedRoute {
                chosen = [DrLLMAction](repeating: forcedRoute[i], count: b)
                routers[i].statistics.recordRoutes(probabilities: chosen.flatMap { a in (0..<3).map { $0 == a.rawValue ? 1 : 0 } },
                                                   chosen: chosen.map(\.rawValue), tokens: pass.lengths)
            } else {
                let logits = routers[i].logits(h, lengths: pass.lengths, windows: windows)
                let probs = softmax(logits)
                chosen = choose(logits)
                routers[i].statistics.recordRoutes(probabilities: probs.scalars, chosen: chosen.map(\.rawValue), tokens: pass.lengths)
                switch mode {
                case .hard: break
                case .straightThrough:
                    let hard = Tensor(shape: [b, 3], values: chosen.flatMap { a in (0..<3).map { $0 == a.rawValue ? Float(1) : 0 } })
                    weights = hard + (probs - probs.detached())
                case .soft: weights = probs
                }
                if mode != .hard {
                    let runs = probs.slice(dim: 1, 1..<2) + probs.slice(dim: 1, 2..<3) * 2
                    expected = expected.map { $0 + runs } ?? runs
                }
            }
            for r in 0..<b { routes[r].append(chosen[r]) }
            h = apply(layer, index: i, h, chosen: chosen, weights: weights, pass: pass)
        }
        expectedRuns = expected?.reshaped([b])
        lastRoutes = routes
        if let cache, stored == nil, let first = routes.first { cache.layerRoutes = first.map(\.rawValue) }
        return h
    }

    /// Per sequence, the most likely action (after Gumbel noise in a straight-through pass).
    private func choose(_ logits: Tensor) -> [DrLLMAction] {
        let b = logits.shape[0], p = logits.pointer
        return (0..<b).map { r in
            var best = 0, bestValue = -Float.infinity
            for j in 0..<3 {
                var v = p[r * 3 + j]
                // A router that produced NaN runs its layer (the dense model's choice).
                if v.isNaN { return .execute }
                if mode == .straightThrough && explorationNoise > 0 {
                    let u = min(max(rng.nextUniform(), 1e-7), 1 - 1e-7)
                    v += explorationNoise * -Foundation.log(-Foundation.log(u))
                }
                if v > bestValue { best = j; bestValue = v }
            }
            return DrLLMAction(rawValue: best) ?? .execute
        }
    }

    /// The layer's output under the chosen actions: hard (only the runs some sequence needs; a batch that mixes
    /// actions takes each row from its own), or the weighted sum of the three outputs.
    private func apply(_ layer: LlamaDecoderLayer, index: Int, _ x: Tensor, chosen: [DrLLMAction], weights: Tensor?,
                       pass: LayerPass) -> Tensor {
        let runs = weights == nil ? chosen.map(\.rawValue).max() ?? 1 : 2
        guard runs > 0 else { return x }
        let once = layer.run(x, positions: pass.positions, mask: pass.mask, cache: pass.cache?.layer(index, execution: 0))
        let twice = runs > 1
            ? layer.run(once, positions: pass.positions, mask: pass.mask, cache: pass.cache?.layer(index, execution: 1)) : once
        let b = x.shape[0]
        if let weights {
            func w(_ j: Int) -> Tensor { weights.slice(dim: 1, j..<(j + 1)).reshaped([b, 1, 1]) }
            return x * w(0) + once * w(1) + twice * w(2)
        }
        let outputs = [x, once, twice]
        if chosen.allSatisfy({ $0 == chosen[0] }) { return outputs[chosen[0].rawValue] }
        return concat((0..<b).map { outputs[chosen[$0].rawValue].slice(dim: 0, $0..<($0 + 1)) }, dim: 0)
    }

    /// The training objective of one batch: the mean next-token cross-entropy of `model` (whose depth policy this
    /// routing must be) over `targets` (`[batch · length]`, -100 ignored) plus `computePenalty` times the mean
    /// expected layer runs per sequence divided by the layer count. Returns the loss (recorded for autograd) and
    /// the mean layer runs the hard route took.
    public func trainingLoss(model: LlamaModel, batch: TokenBatch, targets: [Int32],
                             computePenalty: Float) throws -> (loss: Tensor, meanRuns: Double) {
        var loss = try model.dynamicDepthLanguageLoss(policy: self, method: "Dr.LLM", batch: batch, targets: targets)
        if computePenalty != 0, let expectedRuns {
            loss = loss + mean(expectedRuns) * (computePenalty / Float(routers.count))
        }
        let runs = lastRoutes.map { Double($0.reduce(0) { $0 + $1.rawValue }) }
        return (loss, runs.reduce(0, +) / Double(max(runs.count, 1)))
    }
}

extension LlamaModel {
    /// The Dr.LLM routing installed as the depth policy, if any.
    public var drLLMRouting: DrLLMRouting? { depthPolicy as? DrLLMRouting }

    /// Router statistics of the depth policy's routers (Dr.LLM's per layer, or Mixture-of-Recursions' one router
    /// with its depth histogram), then of the per-token feed-forward dispatchers (DyT, Duo-LLM), each in layer
    /// order; empty without any.
    public var depthRouterStatistics: [RouterLayerStatistics] {
        let policy = drLLMRouting?.statistics ?? recursionRouting.map { [$0.statistics] } ?? []
        return policy + layers.compactMap { ($0.feedForwardOverride as? any TokenDispatchBlock)?.statistics }
    }
}
