import GraftModels
import GraftTensor

/// LoHa (Hyeon-Woo et al., FedPara): a Hadamard product of two low-rank products,
/// `ΔW = (α/r) · (W1a W1b) ⊙ (W2a W2b)`, applied as `y = W x + ΔW x` (ΔW is formed: the product does not
/// factor). PEFT keys `hada_w1_a` `[out, r]`, `hada_w1_b` `[r, in]`, `hada_w2_a`, `hada_w2_b`.
public final class LoHaLayer: DenseDeltaMethod {
    public let state: AdapterState
    public let w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor
    /// `α / r`.
    public let scaling: Float

    /// Creates the layer as PEFT initializes it: W2b zero (ΔW = 0), the others Kaiming-uniform.
    public init(base: Linear, rank: Int, alpha: Float, state: AdapterState) {
        self.state = state
        scaling = alpha / Float(rank)
        w1a = kaimingUniform(base.outFeatures, rank, rng: &state.rng).requiringGrad()
        w1b = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
        w2a = kaimingUniform(base.outFeatures, rank, rng: &state.rng).requiringGrad()
        w2b = Tensor(zeros: [rank, base.inFeatures]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)]
    }

    /// ΔW, recorded for autograd.
    public func delta() -> Tensor { (matmul(w1a, w1b) * matmul(w2a, w2b)) * scaling }
}

/// LoHa (`peft_type: "LOHA"`): `r`, `alpha`, `rank_pattern`, `alpha_pattern`.
public enum LoHaFactory: AdapterMethodFactory {
    public static let peftType = "LOHA"
    public static let family = "weight-delta (Hadamard)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "alpha": 16, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        try rejectUnsupported(config, ["use_effective_conv2d"], rankDropout: true)
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "alpha")
        return LoHaLayer(base: layer, rank: r, alpha: alpha, state: state)
    }
}
