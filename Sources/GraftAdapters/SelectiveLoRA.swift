import GraftModels
import GraftTensor

/// Selective LoRA (2025, "fine tuning without catastrophic forgetting"): TAPS' gate on LoRA blocks,
/// `y = W x + b + I(s ≥ τ) · (α/r) B A x`, with the L1 penalty `λ Σ |s|` (``GatePenalty``) switching blocks off
/// so that only a few adapt; the gate trains through the straight-through estimator (``LayerGate``).
///
/// One block is one target module's LoRA (our reading of "LoRA blocks"); A is Kaiming-uniform and B zero as in
/// LoRA; `init_score` 1, `threshold` 0.1 and `l1_weight` 1e-3 are our defaults.
public final class SelectiveLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[r, in]`, `[out, r]`.
    public let loraA: Tensor, loraB: Tensor
    /// `α/r`.
    public let scaling: Float
    /// The block's gate.
    public let gate: LayerGate
    let dropoutProbability: Float

    /// Creates the block with LoRA's initialization and the gate at `initialScore`.
    public init(base: Linear, rank: Int, alpha: Float, dropout: Float, initialScore: Float, threshold: Float, state: AdapterState) {
        self.state = state
        scaling = alpha / Float(rank)
        dropoutProbability = dropout
        loraA = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
        loraB = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        gate = LayerGate(initialScore: initialScore, threshold: threshold)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("lora_A.weight", loraA), ("lora_B.weight", loraB), ("lora_gate_score", gate.score)]
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state), loraA)
        return y + linear(h, loraB) * (gate.recorded() * scaling)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(loraB, loraA) * ((gate.isOn ? 1 : 0) * scaling) }
    }
}

/// Selective LoRA (`peft_type: "SELECTIVE_LORA"`, no PEFT counterpart): LoRA's `r`, `lora_alpha`,
/// `lora_dropout`, `rank_pattern`, `alpha_pattern`, and the gate's `init_score` (default 1), `threshold` (τ,
/// default 0.1), `l1_weight` (λ, default 1e-3). Keys per module: `lora_A.weight`, `lora_B.weight`,
/// `lora_gate_score` `[1]`.
public enum SelectiveLoRAFactory: AdapterMethodFactory {
    public static let peftType = "SELECTIVE_LORA"
    public static let family = "weight-delta (gated LoRA blocks, L1 on the gates)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "lora_alpha": 16, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try gateOptions(config)
        try validateDropoutBiasAndLayout(config, dropoutKey: "lora_dropout")
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "lora_alpha")
        let options = try gateOptions(config)
        return SelectiveLoRALayer(base: layer, rank: r, alpha: alpha, dropout: Float(try config.double("lora_dropout", default: 0)),
                                  initialScore: options.score, threshold: options.threshold, state: state)
    }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        GatePenalty(method: "Selective LoRA", gates: adapter.layers.compactMap { l in (l.adapter as? SelectiveLoRALayer).map { (l.path, $0.gate) } },
                    weight: try gateOptions(adapter.config).weight)
    }
}
