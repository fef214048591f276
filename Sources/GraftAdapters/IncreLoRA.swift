import GraftModels
import GraftTensor

/// IncreLoRA (Zhang et al., 2023, incremental parameter allocation): AdaLoRA's triplet form
/// `ΔW = s · B (A ⊙ E)`, `A` `[R, in]`, `B` `[out, R]`, singular values `E` `[R, 1]`, but each module *starts*
/// with `init_r` triplets and the allocator (``IncreLoRAAllocator``) adds triplets to the most important modules
/// during training until the total rank reaches the budget.
///
/// The tensors hold `max_r` triplets; triplets not yet added are masked out of the forward pass (zero gradients,
/// no effect). A and B are drawn N(0, 0.02) and E is zero as in AdaLoRA, so a triplet enters with `E_i = 0` and
/// adding it leaves the output unchanged. `s = lora_alpha / target_r`, fixed (our choice: the paper's code
/// rescales by the current rank, which would change the function at every growth).
public final class IncreLoRALayer: GrowingRankLayer {
    public let state: AdapterState
    /// `[R, in]`, `[out, R]`, `[R, 1]` with `R` the capacity.
    public let loraA: Tensor, loraB: Tensor, loraE: Tensor
    /// The fixed multiplier `s`.
    public let scaling: Float
    /// Triplets in use.
    public private(set) var activeRank: Int
    /// Triplets the tensors hold (`max_r`).
    public var capacity: Int { loraE.shape[0] }
    private var mask: Tensor
    let dropoutProbability: Float

    /// Creates the layer with `rank` of its `capacity` triplets active.
    public init(base: Linear, rank: Int, capacity: Int, scaling: Float, dropout: Float, state: AdapterState) {
        self.state = state
        self.scaling = scaling
        dropoutProbability = dropout
        activeRank = rank
        loraA = Tensor.randomNormal([capacity, base.inFeatures], std: 0.02, rng: &state.rng).requiringGrad()
        loraB = Tensor.randomNormal([base.outFeatures, capacity], std: 0.02, rng: &state.rng).requiringGrad()
        loraE = Tensor(zeros: [capacity, 1]).requiringGrad()
        mask = rankMask(active: rank, capacity: capacity)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("lora_A", loraA), ("lora_B", loraB), ("lora_E", loraE)] }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state), loraA * (loraE * mask))
        return y + linear(h, loraB) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { matmul(loraB, loraA * (loraE * mask)) * scaling } }

    public func grow(by count: Int) {
        activeRank = min(capacity, activeRank + max(0, count))
        mask = rankMask(active: activeRank, capacity: capacity)
    }

    public func loraFactors() -> (a: Tensor, b: Tensor) {
        let r = activeRank, inF = loraA.shape[1], outF = loraB.shape[0], cap = capacity
        let a = Tensor(zeros: [r, inF]), b = Tensor(zeros: [outF, r])
        a.pointer.update(from: loraA.pointer, count: r * inF)
        for o in 0..<outF {
            for j in 0..<r { b.pointer[o * r + j] = loraB.pointer[o * cap + j] * loraE.pointer[j] * scaling }
        }
        return (a, b)
    }

    /// Mean smoothed sensitivity `Ī·Ū` over the active entries of A, B and E (the module's importance).
    func meanScore(_ score: (Tensor) -> [Float]) -> Float {
        let r = activeRank, inF = loraA.shape[1], outF = loraB.shape[0], cap = capacity
        let a = score(loraA), b = score(loraB), e = score(loraE)
        var total: Float = 0
        for i in 0..<(r * inF) { total += a[i] }
        for o in 0..<outF { for j in 0..<r { total += b[o * cap + j] } }
        for j in 0..<r { total += e[j] }
        return total / Float(r * (inF + outF + 1))
    }
}

/// IncreLoRA (`peft_type: "INCRELORA"`, no PEFT counterpart; saved as PEFT LoRA with `rank_pattern`):
/// `init_r` (triplets per module at the start, default 2), `target_r` (average rank at the end: the budget is
/// `target_r × modules`, or `target_total_rank`), `max_r` (a module's most triplets, default `2 × target_r`),
/// `lora_alpha` (default 8), `lora_dropout`, and the schedule `tinit`, `tfinal`, `deltaT` (default 10),
/// `total_step` (default: the trainer's), `beta1`, `beta2` (0.85).
public enum IncreLoRAFactory: AdapterMethodFactory {
    public static let peftType = "INCRELORA"
    public static let family = "weight-delta (adaptive rank, grows by importance)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["init_r": 2, "target_r": 4, "max_r": 8, "lora_alpha": 8, "deltaT": 2, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("init_r", default: 2), target = try config.int("target_r", default: 8)
        let cap = try config.int("max_r", default: 2 * target)
        guard r >= 1, target >= r, cap >= r else {
            throw GraftError.invalid("\(config.source): IncreLoRA needs 1 ≤ init_r ≤ target_r and max_r ≥ init_r (got init_r \(r), target_r \(target), max_r \(cap))")
        }
        try validateDropoutBiasAndLayout(config, dropoutKey: "lora_dropout")
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let target = try config.int("target_r", default: 8)
        return IncreLoRALayer(base: layer, rank: try config.int("init_r", default: 2),
                              capacity: try config.int("max_r", default: 2 * target),
                              scaling: Float(try config.double("lora_alpha", default: 8)) / Float(target),
                              dropout: Float(try config.double("lora_dropout", default: 0)), state: state)
    }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        try IncreLoRAAllocator(config: adapter.config, layers: adapter.layers.compactMap { l in
            (l.adapter as? IncreLoRALayer).map { (l.path, $0) }
        })
    }
}

/// IncreLoRA's allocator. After every optimizer update it smooths each entry's sensitivity `I = |θ·∇θ|` with
/// AdaLoRA's EMAs (`Ī ← β₁Ī + (1−β₁)I`, `Ū ← β₂Ū + (1−β₂)|I − Ī|`) and scores a module by the mean `Ī·Ū` over its
/// active entries. Growth steps are every `deltaT`-th step after `tinit` up to `total_step − tfinal`; at each,
/// the `k = ⌈(budget − total rank) / growth steps left⌉` highest-scoring modules with room get one triplet each,
/// so the total reaches the budget at the last growth step and never passes it. (The paper adds ranks to the
/// top modules at intervals; how many per interval, and one triplet per module, are our choices.)
public final class IncreLoRAAllocator: AdapterTrainingHook {
    let layers: [IncreLoRALayer]
    let tinit: Int, tfinal: Int, deltaT: Int
    let beta1: Float, beta2: Float
    let configuredTotalStep: Int?
    /// The total-rank budget.
    public let budget: Int
    /// The module scores of the last growth step, in layer order.
    public private(set) var lastScores: [Float] = []
    private var sensitivity = SmoothedSensitivity(beta1: 0.85, beta2: 0.85)
    private var record: RankGrowthRecord

    /// The allocator for `layers` (module path, layer) with the schedule of `config`.
    public init(config: AdapterConfig, layers: [(String, IncreLoRALayer)]) throws {
        self.layers = layers.map(\.1)
        tinit = try config.int("tinit", default: 0)
        tfinal = try config.int("tfinal", default: 0)
        deltaT = try config.int("deltaT", default: 10)
        beta1 = Float(try config.double("beta1", default: 0.85))
        beta2 = Float(try config.double("beta2", default: 0.85))
        sensitivity = SmoothedSensitivity(beta1: beta1, beta2: beta2)
        let total = try config.int("total_step", default: 0)
        configuredTotalStep = total > 0 ? total : nil
        for (key, value) in [("beta1", beta1), ("beta2", beta2)] where !(value > 0 && value < 1) {
            throw GraftError.invalid("\(config.source): '\(key)' must be in (0, 1), got \(value)")
        }
        guard tinit >= 0, tfinal >= 0, deltaT >= 1 else {
            throw GraftError.invalid("\(config.source): IncreLoRA needs tinit, tfinal ≥ 0 and deltaT ≥ 1")
        }
        let target = try config.int("target_r", default: 8)
        budget = try config.int("target_total_rank", default: target * layers.count)
        let initial = self.layers.reduce(0) { $0 + $1.activeRank }
        let room = self.layers.reduce(0) { $0 + $1.capacity }
        guard budget >= initial, budget <= room else {
            throw GraftError.invalid("\(config.source): IncreLoRA's budget \(budget) must lie between the initial total rank \(initial) and the capacity \(room) (max_r × \(layers.count) modules)")
        }
        record = RankGrowthRecord(paths: layers.map(\.0), ranks: self.layers.map(\.activeRank))
    }

    /// Current ranks per module, in layer order.
    public var ranks: [Int] { layers.map(\.activeRank) }
    /// `(step, ranks)` after every growth, from the initial ranks at step 0.
    public var history: [(step: Int, ranks: [Int])] { record.history }

    /// Whether `step` of a run of `total` steps is a growth step.
    public func isGrowthStep(_ step: Int, totalSteps total: Int) -> Bool {
        step > tinit && step <= total - tfinal && step % deltaT == 0
    }

    public func didUpdate(step: Int, totalSteps: Int) {
        let total = configuredTotalStep ?? totalSteps
        guard step <= total - tfinal else { return }
        updateImportance()
        guard isGrowthStep(step, totalSteps: total) else { return }
        let current = ranks.reduce(0, +)
        guard current < budget else { return }
        let stepsLeft = (step...(total - tfinal)).filter { isGrowthStep($0, totalSteps: total) }.count
        let k = (budget - current + stepsLeft - 1) / max(stepsLeft, 1)
        let scores = layers.map { $0.meanScore(score) }
        lastScores = scores
        let order = layers.indices.filter { layers[$0].activeRank < layers[$0].capacity }
            .sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }
        for i in order.prefix(min(k, budget - current)) { layers[i].grow(by: 1) }
        record.record(step: step, ranks: ranks, budget: budget, method: "IncreLoRA", note: "top \(k) by importance")
    }

    public func takeLogLines() -> [String] { record.takeLines() }
    public func reportLines() -> [String] { record.report(method: "IncreLoRA", budget: budget) }

    private func updateImportance() {
        sensitivity.update(layers.flatMap { [$0.loraA, $0.loraB, $0.loraE] })
    }

    private func score(_ p: Tensor) -> [Float] { sensitivity.score(p) }
}
