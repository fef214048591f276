import Foundation
import GraftModels
import GraftTensor

/// TriAdaptLoRA (Liang et al., 2025): `ΔW = s · B C A` with `A` `[R, in]`, `B` `[out, R]` and an `r × r` core
/// split into triangles, `C = L + U` — `L` lower triangular with the diagonal (`lora_C_lower`), `U` strictly
/// upper (`lora_C_upper`) — so growing the rank from `r` to `r'` adds the new rows of `L` and the new columns of
/// `U` (plus the new rows of A and columns of B). `s = lora_alpha / (r + 1e-5)` with `r` the current rank, as the
/// authors' code; growth therefore rescales the update by `r/r'`.
///
/// The tensors hold `max_r` ranks; ranks not yet grown are masked out (zero gradients, no effect). A and B are
/// drawn N(0, 0.02) and the core starts at zero, so the initial update is zero and new core entries enter at
/// zero. (The authors' code splits the core into blocks, one row block and one column block per growth, whose
/// diagonal blocks overlap; we split element-wise, the same function class without the doubled diagonal.)
public final class TriAdaptLoRALayer: GrowingRankLayer {
    public let state: AdapterState
    /// `[R, in]`, `[out, R]`.
    public let loraA: Tensor, loraB: Tensor
    /// The core's triangles `[R, R]`: entries outside their triangle are masked out of the forward pass.
    public let lower: Tensor, upper: Tensor
    /// `lora_alpha` (the scaling is `α / (r + 1e-5)`).
    public let alpha: Float
    /// Ranks in use.
    public private(set) var activeRank: Int
    /// Ranks the tensors hold (`max_r`).
    public let capacity: Int
    private var lowerMask: Tensor, upperMask: Tensor
    let dropoutProbability: Float
    /// `‖C‖_F / blocks` at the previous scoring, and the number of growths so far plus one.
    var previousNorm: Float = 0
    var blocks = 1

    /// Creates the layer with `rank` of its `capacity` ranks active.
    public init(base: Linear, rank: Int, capacity: Int, alpha: Float, dropout: Float, state: AdapterState) {
        self.state = state
        self.alpha = alpha
        self.capacity = capacity
        dropoutProbability = dropout
        activeRank = rank
        loraA = Tensor.randomNormal([capacity, base.inFeatures], std: 0.02, rng: &state.rng).requiringGrad()
        loraB = Tensor.randomNormal([base.outFeatures, capacity], std: 0.02, rng: &state.rng).requiringGrad()
        lower = Tensor(zeros: [capacity, capacity]).requiringGrad()
        upper = Tensor(zeros: [capacity, capacity]).requiringGrad()
        (lowerMask, upperMask) = TriAdaptLoRALayer.masks(active: rank, capacity: capacity)
    }

    /// 0/1 masks of the active lower (with diagonal) and strictly upper triangles.
    static func masks(active r: Int, capacity n: Int) -> (Tensor, Tensor) {
        var l = [Float](repeating: 0, count: n * n), u = l
        for i in 0..<r {
            for j in 0..<r { if j <= i { l[i * n + j] = 1 } else { u[i * n + j] = 1 } }
        }
        return (Tensor(shape: [n, n], values: l), Tensor(shape: [n, n], values: u))
    }

    /// `s = α / (r + 1e-5)`.
    public var scaling: Float { alpha / (Float(activeRank) + 1e-5) }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("lora_A", loraA), ("lora_B", loraB), ("lora_C_lower", lower), ("lora_C_upper", upper)]
    }

    /// The core `C = L + U` on the active ranks, recorded.
    func core() -> Tensor { lower * lowerMask + upper * upperMask }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(linear(dropout(x, p: dropoutProbability, state: state), loraA), core())
        return y + linear(h, loraB) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { matmul(loraB, matmul(core(), loraA)) * scaling } }

    public func grow(by count: Int) {
        activeRank = min(capacity, activeRank + max(0, count))
        (lowerMask, upperMask) = TriAdaptLoRALayer.masks(active: activeRank, capacity: capacity)
        blocks += 1
    }

    public func loraFactors() -> (a: Tensor, b: Tensor) {
        withNoGrad {
            let r = activeRank, inF = loraA.shape[1], outF = loraB.shape[0], n = capacity
            let a = Tensor(zeros: [r, inF]), b = Tensor(zeros: [outF, r])
            a.pointer.update(from: loraA.pointer, count: r * inF)
            let bc = matmul(loraB, core())  // [out, R]; columns ≥ r are zero
            for o in 0..<outF {
                for j in 0..<r { b.pointer[o * r + j] = bc.pointer[o * n + j] * scaling }
            }
            return (a, b)
        }
    }

    /// The importance score: the change of `‖C‖_F / blocks` since the previous scoring (the authors' normalized
    /// Frobenius norm), which it records.
    func score() -> Float {
        let c = withNoGrad { core() }
        var s: Double = 0
        for i in 0..<c.count { s += Double(c.pointer[i]) * Double(c.pointer[i]) }
        let norm = Float(s.squareRoot()) / Float(blocks)
        defer { previousNorm = norm }
        return norm - previousNorm
    }
}

/// TriAdaptLoRA (`peft_type: "TRIADAPTLORA"`, no PEFT counterpart; saved as PEFT LoRA with `rank_pattern`), keys
/// after the authors' code: `init_r` (default 1), `target_r` (their `reference_rank`: the budget is `target_r ×
/// modules`, or `target_total_rank`), `max_r` (a module's most ranks, default `2 × target_r`; our addition, the
/// tensors' capacity), `incre_rank_num` (ranks per growth, default `max(1, target_r / 2)`), `init_warmup`,
/// `incre_interval` (default 1), `rank_growth_model` (`"linear"` or `"non-linear"`), `total_step` (default: the
/// trainer's), `lora_alpha` (default 8), `lora_dropout`.
public enum TriAdaptLoRAFactory: AdapterMethodFactory {
    public static let peftType = "TRIADAPTLORA"
    public static let family = "weight-delta (adaptive rank, triangular core, threshold growth)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["init_r": 2, "target_r": 4, "max_r": 8, "incre_rank_num": 2, "incre_interval": 2, "lora_alpha": 8, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("init_r", default: 1), target = try config.int("target_r", default: 8)
        let cap = try config.int("max_r", default: 2 * target)
        guard r >= 1, target >= r, cap >= r else {
            throw GraftError.invalid("\(config.source): TriAdaptLoRA needs 1 ≤ init_r ≤ target_r and max_r ≥ init_r (got init_r \(r), target_r \(target), max_r \(cap))")
        }
        try validateDropoutBiasAndLayout(config, dropoutKey: "lora_dropout")
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let target = try config.int("target_r", default: 8)
        return TriAdaptLoRALayer(base: layer, rank: try config.int("init_r", default: 1),
                                 capacity: try config.int("max_r", default: 2 * target),
                                 alpha: Float(try config.double("lora_alpha", default: 8)),
                                 dropout: Float(try config.double("lora_dropout", default: 0)), state: state)
    }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        try TriAdaptLoRAAllocator(config: adapter.config, layers: adapter.layers.compactMap { l in
            (l.adapter as? TriAdaptLoRALayer).map { (l.path, $0) }
        })
    }
}

/// TriAdaptLoRA's rank growth. At every `incre_interval`-th step after `init_warmup`, while the total rank is
/// below the budget, every module is scored (``TriAdaptLoRALayer/score()``); the dynamic threshold is the
/// `k`-th highest score with `k = ⌊(budget − total) · c⌋` (`"linear"`) or `⌊exp(c · ln(budget − total))⌋`
/// (`"non-linear"`), `c = (step − init_warmup) / (total_step − init_warmup)`, at least 1; every module scoring
/// at least the threshold grows by `incre_rank_num`. Growth stops at the budget and at `max_r` (the authors'
/// code may overshoot the budget by the last increment; we grow the highest scores first and stop at it).
public final class TriAdaptLoRAAllocator: AdapterTrainingHook {
    let layers: [TriAdaptLoRALayer]
    let warmup: Int, interval: Int, increment: Int
    let linearGrowth: Bool
    let configuredTotalStep: Int?
    /// The total-rank budget.
    public let budget: Int
    /// The module scores of the last growth step, in layer order.
    public private(set) var lastScores: [Float] = []
    private var record: RankGrowthRecord

    /// The allocator for `layers` (module path, layer) with the schedule of `config`.
    public init(config: AdapterConfig, layers: [(String, TriAdaptLoRALayer)]) throws {
        self.layers = layers.map(\.1)
        let target = try config.int("target_r", default: 8)
        warmup = try config.int("init_warmup", default: 0)
        interval = try config.int("incre_interval", default: 1)
        increment = try config.int("incre_rank_num", default: max(1, target / 2))
        let model = try config.string("rank_growth_model") ?? "linear"
        guard model == "linear" || model == "non-linear" else {
            throw GraftError.invalid("\(config.source): 'rank_growth_model' must be \"linear\" or \"non-linear\", got \"\(model)\"")
        }
        linearGrowth = model == "linear"
        let total = try config.int("total_step", default: 0)
        configuredTotalStep = total > 0 ? total : nil
        guard warmup >= 0, interval >= 1, increment >= 1 else {
            throw GraftError.invalid("\(config.source): TriAdaptLoRA needs init_warmup ≥ 0, incre_interval ≥ 1 and incre_rank_num ≥ 1")
        }
        budget = try config.int("target_total_rank", default: target * layers.count)
        let initial = self.layers.reduce(0) { $0 + $1.activeRank }
        let room = self.layers.reduce(0) { $0 + $1.capacity }
        guard budget >= initial, budget <= room else {
            throw GraftError.invalid("\(config.source): TriAdaptLoRA's budget \(budget) must lie between the initial total rank \(initial) and the capacity \(room) (max_r × \(layers.count) modules)")
        }
        record = RankGrowthRecord(paths: layers.map(\.0), ranks: self.layers.map(\.activeRank))
    }

    /// Current ranks per module, in layer order.
    public var ranks: [Int] { layers.map(\.activeRank) }
    /// `(step, ranks)` after every growth, from the initial ranks at step 0.
    public var history: [(step: Int, ranks: [Int])] { record.history }

    /// How many modules the threshold admits at `step` of `total` with `remaining` rank left.
    public func modulesToGrow(step: Int, total: Int, remaining: Int) -> Int {
        let c = total > warmup ? Double(step - warmup) / Double(total - warmup) : 1
        let k = linearGrowth ? Int(Double(remaining) * c) : Int(exp(c * log(Double(max(remaining, 1)))))
        return min(max(k, 1), layers.count)
    }

    public func didUpdate(step: Int, totalSteps: Int) {
        let total = configuredTotalStep ?? totalSteps
        let current = ranks.reduce(0, +)
        guard current < budget, step > warmup, step % interval == 0 else { return }
        let scores = layers.map { $0.score() }
        lastScores = scores
        let k = modulesToGrow(step: step, total: total, remaining: budget - current)
        let threshold = scores.sorted(by: >)[k - 1]
        var left = budget - current
        let order = layers.indices.filter { scores[$0] >= threshold }.sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }
        for i in order where left > 0 && layers[i].activeRank < layers[i].capacity {
            let add = min(increment, left, layers[i].capacity - layers[i].activeRank)
            layers[i].grow(by: add)
            left -= add
        }
        record.record(step: step, ranks: ranks, budget: budget, method: "TriAdaptLoRA",
                      note: String(format: "threshold %.3g admits %d", threshold, k))
    }

    public func takeLogLines() -> [String] { record.takeLines() }
    public func reportLines() -> [String] { record.report(method: "TriAdaptLoRA", budget: budget) }
}
