import Foundation
import GraftModels
import GraftTensor

/// How a Mixture-of-Recursions router's gate scales a recursion's update.
public enum RecursionGate: String, Sendable, CaseIterable {
    /// Value 1 (the pretrained block's update unscaled), gradient of the chosen depth's probability.
    case straightThrough
    /// The chosen depth's probability, as in the paper (in inference too).
    case probability
}

/// Mixture-of-Recursions (Bae et al., 2025) retrofitted to a Llama decoder: a block of consecutive layers is shared
/// across recursion steps, and a token-choice router gives each token its recursion depth `1...N` at the block's
/// entrance; the ``LlamaModel/depthPolicy`` that runs the stack so.
///
/// The stack runs the layers before the block, then the block for up to `N` recursions, then the layers after it
/// (``suffixStart``: the block's end for the dense model with extra recursions, later to replace layers by the
/// shared block). Recursion `r` (0-based) runs only the tokens whose depth exceeds `r`: their hidden states are
/// gathered, run through the block, and the update is scattered back, `h ← h + g·(block(h) − h)` for active
/// tokens (`g` the router's gate, on the recursions after the first: the first is the block's own run, and depths
/// `d` and `d − 1` differ by exactly the later updates), others unchanged.
///
/// KV policy (the paper's recursion-wise caching): at recursion `r` the block's layers attend among the tokens
/// active at `r` only, and a cached sequence keeps, per layer and recursion, the keys and values of exactly those
/// tokens (``KVCache/layer(_:execution:)`` with execution `r`). Routing is token-choice and causal (a token's depth
/// depends on its own hidden state), so a cached pass takes each token's route as an uncached pass does.
///
/// Departures from the paper, for retrofitting a pretrained decoder: the gate enters straight-through by default
/// (``RecursionGate``: its value is 1 in the forward pass, so one recursion for every token is the dense model
/// exactly; its gradient is the probability's; `.probability` is the paper's), the router reads the root-mean-square-normalized hidden state, and training adds a
/// compute penalty on the expected depth instead of the paper's balancing loss. The KV-sharing variant (every
/// recursion reusing the first one's keys) is not built.
public final class MixtureOfRecursions: Module, LayerDepthPolicy {
    /// The shared block's layers, `[blockStart, blockEnd)` of the stack.
    public let blockStart: Int, blockEnd: Int
    /// The first layer run after the recursions (`blockEnd` keeps every layer; larger drops the layers between).
    public let suffixStart: Int
    /// Most recursions a token takes (`N`).
    public let maxRecursions: Int
    /// `[N, hidden]` and `[N]`: the router; a token's depth is `1 + argmax` of its logits.
    public let routerWeight: Tensor, routerBias: Tensor
    /// Whether the policy runs the layer stack.
    public var isEnabled = true
    /// Whether passes record the router for training (gates and the expected depth); the routes stay hard.
    public var trainsRouter = false
    /// How the gate scales each recursion's update (straight-through by default).
    public var gate: RecursionGate = .straightThrough
    /// When set, every token takes this depth and the router does not run.
    public var forcedDepth: Int?
    /// Depth histogram (choice `j` runs the block `j + 1` times), entropy and gate mass of the routed tokens.
    public var statistics: RouterLayerStatistics
    /// Per token `[batch · length]`, the expected depth `Σ_j (j+1) p_j` of the last pass that trained the router,
    /// recorded for autograd; nil otherwise.
    public private(set) var expectedDepth: Tensor?
    /// Per token, the depth of the last pass (padding positions 0).
    public private(set) var lastDepths: [Int] = []
    /// The LoRAs per recursion depth on the block's projections (``addRecursionLoRA(model:rank:alpha:targets:seed:)``);
    /// none by default.
    public internal(set) var recursionAdapters: [RecursionLoRA] = []
    /// The projections the recursion LoRAs target (`o_proj`, `down_proj`, ...).
    public internal(set) var recursionLoRATargets: [String] = []
    let recursionState = RecursionState()
    private let ones: Tensor

    /// A router for `model`'s block `[blockStart, blockEnd)` recursed up to `maxRecursions` times, then the layers
    /// from `suffixStart` on. The router starts at N(0, 0.02²) weights and a bias of `firstDepthBias` on depth 1,
    /// so a new router gives every token one recursion (the dense model when `suffixStart == blockEnd`).
    public convenience init(model: LlamaModel, blockStart: Int, blockEnd: Int, suffixStart: Int? = nil, maxRecursions: Int,
                firstDepthBias: Float = 2, seed: UInt64 = 0) throws {
        let layers = model.layers.count, suffix = suffixStart ?? blockEnd
        guard 0 <= blockStart, blockStart < blockEnd, blockEnd <= suffix, suffix <= layers else {
            throw GraftError.invalid("Mixture-of-Recursions: block [\(blockStart), \(blockEnd)) and suffix start \(suffix) must satisfy 0 ≤ start < end ≤ suffix ≤ \(layers) (the model's layers)")
        }
        guard (1...64).contains(maxRecursions) else {
            throw GraftError.invalid("Mixture-of-Recursions: max_recursions must be in 1...64, got \(maxRecursions)")
        }
        var rng = GraftRNG(seed: seed)
        let h = model.config.hiddenSize
        try self.init(blockStart: blockStart, blockEnd: blockEnd, suffixStart: suffix,
                      routerWeight: Tensor.randomNormal([maxRecursions, h], std: 0.02, rng: &rng),
                      routerBias: Tensor(shape: [maxRecursions], values: (0..<maxRecursions).map { $0 == 0 ? firstDepthBias : 0 }))
    }

    /// A routing from a saved router (`[N, hidden]`, `[N]`); throws when the shapes or the block do not fit.
    public init(blockStart: Int, blockEnd: Int, suffixStart: Int, routerWeight: Tensor, routerBias: Tensor) throws {
        guard routerWeight.rank == 2, (1...64).contains(routerWeight.shape[0]), routerBias.shape == [routerWeight.shape[0]] else {
            throw GraftError.invalid("Mixture-of-Recursions: router shapes \(routerWeight.shape), \(routerBias.shape) must be [N, hidden] and [N], N in 1...64")
        }
        guard 0 <= blockStart, blockStart < blockEnd, blockEnd <= suffixStart else {
            throw GraftError.invalid("Mixture-of-Recursions: block [\(blockStart), \(blockEnd)) and suffix start \(suffixStart) are out of order")
        }
        self.blockStart = blockStart
        self.blockEnd = blockEnd
        self.suffixStart = suffixStart
        maxRecursions = routerWeight.shape[0]
        self.routerWeight = routerWeight
        self.routerBias = routerBias
        ones = Tensor(shape: [routerWeight.shape[1]], values: [Float](repeating: 1, count: routerWeight.shape[1]))
        statistics = RouterLayerStatistics(path: "model.recursion.router", executionsPerChoice: Array(1...routerWeight.shape[0]))
        super.init(typeName: "MixtureOfRecursions")
        register(parameter: "router.weight", routerWeight)
        register(parameter: "router.bias", routerBias)
    }

    /// Layers run per token at depth `d` (the layers outside the block plus `d` times the block).
    public func layersRun(depth: Int, layerCount: Int) -> Int {
        blockStart + depth * (blockEnd - blockStart) + (layerCount - suffixStart)
    }

    /// Clears the statistics.
    public func resetStatistics() {
        statistics = RouterLayerStatistics(path: statistics.path, executionsPerChoice: Array(1...maxRecursions))
    }

    /// Runs `layers` over `x` with the block recursed per token (see the type's description).
    public func runLayers(_ x: Tensor, layers: [LlamaDecoderLayer], pass: LayerPass) throws -> Tensor {
        guard x.rank == 3, pass.lengths.count == x.shape[0], pass.positions.count == x.shape[0] * x.shape[1] else {
            throw GraftError.invalid("Mixture-of-Recursions: a pass over \(x.shape) needs one length per row and one position per token, got \(pass.lengths.count) and \(pass.positions.count)")
        }
        guard suffixStart <= layers.count, routerWeight.shape[1] == x.shape[2] else {
            throw GraftError.invalid("Mixture-of-Recursions: the routing (suffix start \(suffixStart), width \(routerWeight.shape[1])) does not fit a stack of \(layers.count) layers of width \(x.shape[2])")
        }
        if let forcedDepth, !(1...maxRecursions).contains(forcedDepth) {
            throw GraftError.invalid("Mixture-of-Recursions: forced depth \(forcedDepth) must be in 1...\(maxRecursions)")
        }
        guard pass.cache == nil || !trainsRouter else {
            throw GraftError(.unsupported, "Mixture-of-Recursions: router training runs without a KV cache")
        }
        var h = x
        for i in 0..<blockStart {
            h = layers[i].run(h, positions: pass.positions, mask: pass.mask, cache: pass.cache?.layer(i, execution: 0))
        }
        h = try recurse(h, layers: layers, pass: pass)
        for i in suffixStart..<layers.count {
            h = layers[i].run(h, positions: pass.positions, mask: pass.mask, cache: pass.cache?.layer(i, execution: 0))
        }
        return h
    }

    /// The block's recursions: route every real token, then run recursion `r` over each row's tokens deeper than `r`.
    private func recurse(_ x: Tensor, layers: [LlamaDecoderLayer], pass: LayerPass) throws -> Tensor {
        let b = x.shape[0], t = x.shape[1], hd = x.shape[2], n = maxRecursions
        let flat = x.reshaped([b * t, hd])
        var depths = [Int](repeating: 0, count: b * t)
        var gates: Tensor?
        if let forcedDepth {
            for r in 0..<b { for i in 0..<min(pass.lengths[r], t) { depths[r * t + i] = forcedDepth } }
        } else {
            let logits = linear(rmsNorm(flat, weight: ones, eps: 1e-6), routerWeight, routerBias)
            let probs = softmax(logits)
            var probabilities: [Float] = [], chosen: [Int] = []
            var oneHot = [Float](repeating: 0, count: b * t * n)
            for r in 0..<b {
                for i in 0..<min(pass.lengths[r], t) {
                    let row = r * t + i
                    var best = 0
                    for j in 1..<n where logits.pointer[row * n + j] > logits.pointer[row * n + best] { best = j }
                    if logits.pointer[row * n + best].isNaN { best = 0 }
                    depths[row] = best + 1
                    oneHot[row * n + best] = 1
                    chosen.append(best)
                    probabilities += (0..<n).map { probs.pointer[row * n + $0] }
                }
            }
            statistics.recordRoutes(probabilities: probabilities, chosen: chosen, tokens: [Int](repeating: 1, count: chosen.count))
            if trainsRouter || gate == .probability {
                let picked = mul(probs, Tensor(shape: [b * t, n], values: oneHot))
                let p = matmul(picked, Tensor(shape: [n, 1], values: [Float](repeating: 1, count: n)))
                // Straight-through: value 1, gradient of the chosen depth's probability.
                gates = gate == .probability ? p : add(p - p.detached(), 1)
            }
            if trainsRouter {
                expectedDepth = matmul(probs, Tensor(shape: [n, 1], values: (1...n).map(Float.init))).reshaped([b * t])
            }
        }
        if !trainsRouter { expectedDepth = nil }
        lastDepths = depths
        var rows: [Tensor] = []
        for r in 0..<b {
            var h = b == 1 ? flat : flat.slice(dim: 0, (r * t)..<((r + 1) * t))
            let gate = gates.map { b == 1 ? $0 : $0.slice(dim: 0, (r * t)..<((r + 1) * t)) }
            for step in 0..<n {
                let active = (0..<t).filter { depths[r * t + $0] > step }
                guard !active.isEmpty else { break }
                h = try recursion(h, step: step, active: active, gate: gate, layers: layers, pass: pass, row: r, length: t)
            }
            rows.append(h)
        }
        return (b == 1 ? rows[0] : concat(rows, dim: 0)).reshaped([b, t, hd])
    }

    /// One recursion over one row `h` `[t, hidden]`: its `active` tokens run the block (attending among themselves
    /// at their own positions, against this recursion's cache), and their update is scattered back.
    private func recursion(_ h: Tensor, step: Int, active: [Int], gate: Tensor?, layers: [LlamaDecoderLayer],
                           pass: LayerPass, row: Int, length t: Int) throws -> Tensor {
        let hd = h.shape[1], m = active.count
        let all = m == t
        var select = [Float](repeating: 0, count: all ? 0 : m * t)
        for (k, i) in active.enumerated() where !all { select[k * t + i] = 1 }
        let selection = all ? nil : Tensor(shape: [m, t], values: select)
        let gathered = selection.map { matmul($0, h) } ?? h
        let positions = active.map { pass.positions[row * t + $0] }
        let cacheLength = pass.cache.map { $0.layer(blockStart, execution: step).length } ?? 0
        let mask = AttentionMask(causal: true, queryOffset: cacheLength)
        var y = gathered.reshaped([1, m, hd])
        recursionState.current = step
        defer { recursionState.current = 0 }
        for i in blockStart..<blockEnd {
            y = layers[i].run(y, positions: positions, mask: mask, cache: pass.cache?.layer(i, execution: step))
        }
        // Active rows become `gathered + g·(block − gathered)` (exactly the block's output without a gate); the
        // others keep `h` exactly (`h·1 + 0`), so forcing depths reproduces plain stacks bit for bit.
        var updated = y.reshaped([m, hd])
        // The gate scales the recursions after the first: depth d and d − 1 differ by exactly those updates.
        if let gate, step >= 1 { updated = gathered + (updated - gathered) * (selection.map { matmul($0, gate) } ?? gate) }
        guard let selection else { return updated }
        var keep = [Float](repeating: 1, count: t)
        for i in active { keep[i] = 0 }
        return h * Tensor(shape: [t, 1], values: keep) + matmul(selection, updated, transposeA: true)
    }

    /// The training objective of one batch: the mean next-token cross-entropy of `model` (whose depth policy this
    /// routing must be) over `targets` (`[batch · length]`, -100 ignored) plus `computePenalty` times the mean
    /// expected recursion depth of the real tokens. Returns the loss (recorded for autograd) and the mean depth
    /// the hard routes took.
    public func trainingLoss(model: LlamaModel, batch: TokenBatch, targets: [Int32],
                             computePenalty: Float) throws -> (loss: Tensor, meanDepth: Double) {
        var loss = try model.dynamicDepthLanguageLoss(policy: self, method: "Mixture-of-Recursions", batch: batch, targets: targets)
        let real = lastDepths.filter { $0 > 0 }
        if computePenalty != 0, let expectedDepth {
            let mask = Tensor(shape: [lastDepths.count], values: lastDepths.map { $0 > 0 ? 1 / Float(max(real.count, 1)) : 0 })
            loss = loss + sum(expectedDepth * mask) * computePenalty
        }
        return (loss, Double(real.reduce(0, +)) / Double(max(real.count, 1)))
    }
}

extension LlamaModel {
    /// The Mixture-of-Recursions routing installed as the depth policy, if any.
    public var recursionRouting: MixtureOfRecursions? { depthPolicy as? MixtureOfRecursions }
}
