import GraftModels
import GraftTensor

/// TAPS (Wallingford et al., 2022, task adaptive parameter sharing): each target layer gets a task-specific
/// dense weight delta `δW` `[out, in]` (zero at the start) behind a learned gate,
/// `y = W x + b + I(s ≥ τ) · δW x`, and the loss gets `λ Σ |s|` (``GatePenalty``), which drives the scores of
/// layers that do not need adapting below `τ`: those layers then share the base weights. The gate trains through
/// the straight-through estimator (``LayerGate``).
///
/// Our choices where the paper leaves them open for a PEFT engine: the gate is per target module (the paper
/// gates per layer of a CNN/ViT), the penalty is unweighted by layer size, and `init_score` 1, `threshold` 0.1,
/// `l1_weight` 1e-3 are the defaults.
public final class TAPSLayer: DenseDeltaMethod {
    public let state: AdapterState
    /// `δW` `[out, in]`.
    public let weightDelta: Tensor
    /// The layer's gate.
    public let gate: LayerGate

    /// Creates the layer with `δW = 0` and the gate at `initialScore`.
    public init(base: Linear, initialScore: Float, threshold: Float, state: AdapterState) {
        self.state = state
        weightDelta = Tensor(zeros: [base.outFeatures, base.inFeatures]).requiringGrad()
        gate = LayerGate(initialScore: initialScore, threshold: threshold)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("taps_delta", weightDelta), ("taps_score", gate.score)] }

    public func delta() -> Tensor { weightDelta * gate.recorded() }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        y + linear(x, weightDelta) * gate.recorded()
    }
}

/// TAPS (`peft_type: "TAPS"`, no PEFT counterpart): `init_score` (default 1), `threshold` (τ, default 0.1),
/// `l1_weight` (λ, default 1e-3). Keys per module: `taps_delta` `[out, in]`, `taps_score` `[1]`.
public enum TAPSFactory: AdapterMethodFactory {
    public static let peftType = "TAPS"
    public static let family = "selective (gated dense layer deltas, L1 on the gates)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["l1_weight": 1e-3, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws { _ = try gateOptions(config) }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let options = try gateOptions(config)
        return TAPSLayer(base: layer, initialScore: options.score, threshold: options.threshold, state: state)
    }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        GatePenalty(method: "TAPS", gates: adapter.layers.compactMap { l in (l.adapter as? TAPSLayer).map { (l.path, $0.gate) } },
                    weight: try gateOptions(adapter.config).weight)
    }
}
