import GraftModels
import GraftTensor

/// DeLoRA (Bini et al., 2025): LoRA with each rank-one term normalized and the update's norm bounded by λ,
/// `ΔW = (λ / r) · B diag(1 / (‖Aᵢ‖ ‖Bⁱ‖)) A · diag(‖W_{:,j}‖)`: the row norms of `A: [r, in]` and column norms
/// of `B: [out, r]` (each clamped below at 1e-4), scaled per input column by the base weight's column norms
/// captured when the adapter is created (`delora_w_norm`, saved with the adapter). The forward runs
/// `B (s ⊙ A (‖W‖ ⊙ x))` without forming ΔW. PEFT keys `delora_A`, `delora_B`, `delora_lambda` `[1]`,
/// `delora_w_norm` `[in]` (a buffer).
public final class DeLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[r, in]`.
    public let a: Tensor
    /// `[out, r]` (zero at PEFT's default initialization).
    public let b: Tensor
    /// The norm bound λ `[1]` (trainable).
    public let lambda: Tensor
    /// The base weight's column norms `[in]`, fixed when the adapter was created.
    public let weightNorm: Tensor
    let rank: Int
    let dropoutProbability: Float

    init(base: Linear, rank: Int, lambda initialLambda: Float, initWeights: Bool, dropout: Float, state: AdapterState) {
        self.state = state
        self.rank = rank
        dropoutProbability = dropout
        a = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
        b = (initWeights ? Tensor(zeros: [base.outFeatures, rank]) : kaimingUniform(base.outFeatures, rank, rng: &state.rng)).requiringGrad()
        lambda = Tensor(repeating: initialLambda, shape: [1]).requiringGrad()
        let norms = Tensor(zeros: [base.inFeatures])
        let (inF, outF) = (base.inFeatures, base.outFeatures)
        let weight = base.weight
        withExtendedLifetime(weight) {
            let pw = weight.pointer, pn = norms.pointer
            for o in 0..<outF {
                for j in 0..<inF { pn[j] += pw[o * inF + j] * pw[o * inF + j] }
            }
        }
        let pn = norms.pointer
        for j in 0..<inF { pn[j] = pn[j].squareRoot() }
        weightNorm = norms
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("delora_A", a), ("delora_B", b), ("delora_lambda", lambda)]
    }

    public var savedBuffers: [(name: String, tensor: Tensor)] { [("delora_w_norm", weightNorm)] }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {
        guard name == "delora_w_norm" else { return }
        try copyParameter(name, into: weightNorm, from: tensor)
    }

    /// `(λ / r) / (‖Aᵢ‖ ‖Bⁱ‖)` `[r]`, recorded for autograd.
    func rankScaling() -> Tensor {
        let rowNorms = clampedNorms(a, rows: true, floor: 1e-4)
        let colNorms = clampedNorms(b, rows: false, floor: 1e-4)
        return reciprocal(rowNorms * colNorms) * lambda * (1 / Float(rank))
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state) * weightNorm, a) * rankScaling()
        return y + linear(h, b)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(b * rankScaling().reshaped([1, rank]), a) * weightNorm.reshaped([1, weightNorm.count]) }
    }
}

/// `max(‖row‖, floor)` of each row of `m` (`rows`) or each column, recorded for autograd. As PyTorch's
/// `clamp(norm, min:)`, the gradient is `g · m / ‖·‖` where the norm exceeds the floor and zero elsewhere, so a zero
/// column (DeLoRA's B at initialization) gets a zero gradient instead of 0 · ∞.
func clampedNorms(_ m: Tensor, rows: Bool, floor: Float) -> Tensor {
    let (r, c) = (m.shape[0], m.shape[1])
    let count = rows ? r : c
    var raw = [Float](repeating: 0, count: count)
    let pm = m.pointer
    for i in 0..<r {
        for j in 0..<c { raw[rows ? i : j] += pm[i * c + j] * pm[i * c + j] }
    }
    raw = raw.map { $0.squareRoot() }
    let out = Tensor(shape: [count], values: raw.map { max($0, floor) })
    return Tensor.recordingCustomOp(out, inputs: [m]) { g in
        let d = Tensor(zeros: m.shape)
        let pg = g.pointer, pd = d.pointer, pm = m.pointer
        for i in 0..<r {
            for j in 0..<c {
                let k = rows ? i : j
                if raw[k] > floor { pd[i * c + j] = pg[k] * pm[i * c + j] / raw[k] }
            }
        }
        return [d]
    }
}

/// DeLoRA (`peft_type: "DELORA"`): `r` (`rank_pattern`), `delora_lambda` (`lambda_pattern`), `module_dropout`
/// (dropout on the adapter's input, as PEFT applies it), `init_weights`.
public enum DeLoRAFactory: AdapterMethodFactory {
    public static let peftType = "DELORA"
    public static let family = "weight-delta (normalized low rank)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "delora_lambda": 15, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let p = try config.double("module_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'module_dropout' must be in [0, 1), got \(p)") }
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): 'bias' = \(bias) is not supported (only \"none\")")
        }
        _ = try config.patternMap("lambda_pattern")
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let r = try config.patternSize("rank_pattern", path: path, default: try config.int("r", default: 8))
        guard r > 0 else { throw GraftError.invalid("\(config.source): rank for '\(path)' must be positive, got \(r)") }
        let defaultLambda = try config.double("delora_lambda", default: 15)
        let lambda = TargetMatcher.patternValue(try config.patternMap("lambda_pattern"), path: path) ?? defaultLambda
        return DeLoRALayer(base: layer, rank: r, lambda: Float(lambda), initWeights: try config.bool("init_weights", default: true),
                           dropout: Float(try config.double("module_dropout", default: 0)), state: state)
    }
}
