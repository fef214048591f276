import GraftModels
import GraftTensor

/// AdaLoRA (Zhang et al., 2023): LoRA in SVD form, `ΔW = B (A ⊙ E) · α / (r + 1e-5)`, where the singular values
/// `E` `[r, 1]` are pruned during training toward a rank budget (``AdaLoRARankAllocator``). PEFT keys `lora_A`
/// `[r, in]`, `lora_B` `[out, r]`, `lora_E` `[r, 1]`.
public final class AdaLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    public let loraA: Tensor, loraB: Tensor, loraE: Tensor
    /// `lora_alpha / (r + 1e-5)` with `r` the initial rank, as PEFT's `ranknum`.
    public let scaling: Float
    let dropoutProbability: Float

    /// Creates the layer as PEFT does: A, B normal(0, 0.02), E zero.
    public init(base: Linear, rank: Int, alpha: Float, dropout: Float, state: AdapterState) {
        self.state = state
        scaling = alpha / (Float(rank) + 1e-5)
        dropoutProbability = dropout
        loraA = Tensor.randomNormal([rank, base.inFeatures], std: 0.02, rng: &state.rng).requiringGrad()
        loraB = Tensor.randomNormal([base.outFeatures, rank], std: 0.02, rng: &state.rng).requiringGrad()
        loraE = Tensor(zeros: [rank, 1]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("lora_A", loraA), ("lora_B", loraB), ("lora_E", loraE)] }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state), loraA * loraE)
        return y + linear(h, loraB) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { matmul(loraB, loraA * loraE) * scaling } }
}

/// AdaLoRA (`peft_type: "ADALORA"`): `init_r`, `target_r`, `lora_alpha`, `lora_dropout`, and the training keys
/// `tinit`, `tfinal`, `deltaT`, `beta1`, `beta2`, `orth_reg_weight`, `total_step` (PEFT's defaults).
public enum AdaLoRAFactory: AdapterMethodFactory {
    public static let peftType = "ADALORA"
    public static let family = "weight-delta (adaptive-rank SVD)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["init_r": 12, "target_r": 8, "lora_alpha": 8, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("init_r", default: 12)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'init_r' must be positive, got \(r)") }
        // PEFT's AdaLoRA inherits `r` from LoraConfig and ignores it: init_r and target_r set the ranks.
        config.acknowledge("r")
    }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        try AdaLoRARankAllocator(config: adapter.config, layers: adapter.layers.compactMap { $0.adapter as? AdaLoRALayer })
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        AdaLoRALayer(base: layer, rank: try config.int("init_r", default: 12),
                     alpha: Float(try config.double("lora_alpha", default: 8)),
                     dropout: Float(try config.double("lora_dropout", default: 0)), state: state)
    }
}

/// AdaLoRA's training-time behaviour, as PEFT's `RankAllocator` and `AdaLoraModel`:
///
/// - the orthogonality penalty `orth_reg_weight · mean over A and B of ‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F`, added to
///   the loss;
/// - after each update, the importance of every entry `|θ · ∇θ|` smoothed by an EMA (`beta1`) and its
///   uncertainty `|I − Ī|` by another (`beta2`); a triplet's score is `s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`
///   with `s = Ī · Ū`;
/// - the total rank budget stays at `Σ init_r` for `tinit` steps, falls on a cubic schedule to
///   `target_r · layers` at step `total_step − tfinal`, and every `deltaT` steps the lowest-scoring triplets
///   beyond the budget get `E_i = 0`; after that the final pattern is kept (masked entries stay zero).
///
/// Masked triplets keep their full-size tensors with zero singular values, so a saved adapter loads in PEFT
/// (without a `rank_pattern`) and computes the same function.
public final class AdaLoRARankAllocator: AdapterTrainingHook {
    let layers: [AdaLoRALayer]
    let targetRank: Int, tinit: Int, tfinal: Int, deltaT: Int
    let beta1: Float, beta2: Float, orthogonalityWeight: Float
    let configuredTotalStep: Int?
    private var sensitivity = SmoothedSensitivity(beta1: 0.85, beta2: 0.85)
    /// Per layer, which triplets the last allocation kept (nil before the first).
    public private(set) var rankPattern: [[Bool]]?
    /// The rank budget of the last update.
    public private(set) var budget: Int

    /// The allocator for `layers` with the schedule of `config`.
    public init(config: AdapterConfig, layers: [AdaLoRALayer]) throws {
        self.layers = layers
        targetRank = try config.int("target_r", default: 8)
        tinit = try config.int("tinit", default: 0)
        tfinal = try config.int("tfinal", default: 0)
        deltaT = try config.int("deltaT", default: 1)
        beta1 = Float(try config.double("beta1", default: 0.85))
        beta2 = Float(try config.double("beta2", default: 0.85))
        sensitivity = SmoothedSensitivity(beta1: beta1, beta2: beta2)
        orthogonalityWeight = Float(try config.double("orth_reg_weight", default: 0.5))
        let total = try config.int("total_step", default: 0)
        configuredTotalStep = total > 0 ? total : nil
        for (key, value) in [("beta1", beta1), ("beta2", beta2)] where !(value > 0 && value < 1) {
            throw GraftError.invalid("\(config.source): '\(key)' must be in (0, 1), got \(value)")
        }
        guard targetRank >= 0, tinit >= 0, tfinal >= 0, deltaT >= 1, orthogonalityWeight >= 0 else {
            throw GraftError.invalid("\(config.source): AdaLoRA needs target_r, tinit, tfinal, orth_reg_weight ≥ 0 and deltaT ≥ 1")
        }
        budget = layers.reduce(0) { $0 + $1.loraE.shape[0] }
    }

    /// Σ init_r over the layers.
    public var initialBudget: Int { layers.reduce(0) { $0 + $1.loraE.shape[0] } }
    /// target_r × layers.
    public var targetBudget: Int { targetRank * layers.count }

    public func regularization() -> Tensor? {
        guard orthogonalityWeight > 0, !layers.isEmpty else { return nil }
        var total: Tensor?
        for layer in layers {
            let r = layer.loraE.shape[0]
            var eye = [Float](repeating: 0, count: r * r)
            for i in 0..<r { eye[i * r + i] = 1 }
            let identity = Tensor(shape: [r, r], values: eye)
            for cov in [matmul(layer.loraA, layer.loraA, transposeB: true), matmul(layer.loraB, layer.loraB, transposeA: true)] {
                let d = cov - identity
                let norm = sqrt(sum(d * d))
                total = total.map { $0 + norm } ?? norm
            }
        }
        return total.map { $0 * (orthogonalityWeight / Float(2 * layers.count)) }
    }

    /// The budget and whether to mask at `step`, PEFT's cubic schedule.
    public func schedule(step: Int, totalSteps: Int) -> (budget: Int, mask: Bool) {
        if step <= tinit { return (initialBudget, false) }
        if step > totalSteps - tfinal { return (targetBudget, true) }
        let span = Double(totalSteps - tfinal - tinit)
        let coefficient = span > 0 ? 1 - Double(step - tinit) / span : 0
        let b = Int(Double(initialBudget - targetBudget) * coefficient * coefficient * coefficient + Double(targetBudget))
        return (b, step % deltaT == 0)
    }

    public func didUpdate(step: Int, totalSteps: Int) {
        let total = configuredTotalStep ?? totalSteps
        let finalStep = total - tfinal
        if step < finalStep {
            updateImportance()
            let (b, mask) = schedule(step: step, totalSteps: total)
            budget = b
            if mask { maskToBudget(b) }
        } else if step == finalStep {
            budget = targetBudget
            maskToBudget(targetBudget)
            sensitivity.reset()
        } else if let pattern = rankPattern {
            budget = targetBudget
            for (layer, keep) in zip(layers, pattern) {
                for (i, k) in keep.enumerated() where !k { layer.loraE.pointer[i] = 0 }
            }
        }
    }

    private func updateImportance() {
        sensitivity.update(layers.flatMap { [$0.loraA, $0.loraB, $0.loraE] })
    }

    private func score(_ p: Tensor) -> [Float] { sensitivity.score(p) }

    /// Triplet scores per layer.
    func tripletScores() -> [[Float]] {
        layers.map { layer in
            let r = layer.loraE.shape[0], inF = layer.loraA.shape[1], outF = layer.loraB.shape[0]
            let e = score(layer.loraE), a = score(layer.loraA), b = score(layer.loraB)
            return (0..<r).map { i in
                var rowA: Float = 0, colB: Float = 0
                for j in 0..<inF { rowA += a[i * inF + j] }
                for o in 0..<outF { colB += b[o * r + i] }
                return e[i] + rowA / Float(inF) + colB / Float(outF)
            }
        }
    }

    private func maskToBudget(_ budget: Int) {
        let scores = tripletScores()
        let k = initialBudget - budget
        guard k > 0 else { return }
        let threshold = scores.flatMap { $0 }.sorted()[min(k, initialBudget) - 1]
        var pattern: [[Bool]] = []
        for (layer, s) in zip(layers, scores) {
            var keep: [Bool] = []
            for (i, v) in s.enumerated() {
                let kept = !(v <= threshold)
                if !kept { layer.loraE.pointer[i] = 0 }
                keep.append(kept)
            }
            pattern.append(keep)
        }
        rankPattern = pattern
    }
}
