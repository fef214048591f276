import GraftModels
import GraftTensor

/// AdaLoRA (Zhang et al., 2023): LoRA in SVD form, `ΔW = B (A ⊙ E) · α / (r + 1e-5)`, where the singular values
/// `E` `[r, 1]` are pruned during training toward a rank budget. PEFT keys `lora_A` `[r, in]`, `lora_B`
/// `[out, r]`, `lora_E` `[r, 1]`. Forward parity, merge and training of the factors are here; the rank-budget
/// schedule and orthogonality penalty join with the catalog's training work.
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

/// AdaLoRA (`peft_type: "ADALORA"`): `init_r`, `target_r`, `lora_alpha`, `lora_dropout`, schedule keys.
public enum AdaLoRAFactory: AdapterMethodFactory {
    public static let peftType = "ADALORA"
    public static let family = "weight-delta (adaptive-rank SVD)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["init_r": 12, "target_r": 8, "lora_alpha": 8, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("init_r", default: 12)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'init_r' must be positive, got \(r)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        AdaLoRALayer(base: layer, rank: try config.int("init_r", default: 12),
                     alpha: Float(try config.double("lora_alpha", default: 8)),
                     dropout: Float(try config.double("lora_dropout", default: 0)), state: state)
    }
}
