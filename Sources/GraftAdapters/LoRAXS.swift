import GraftModels
import GraftTensor

/// LoRA-XS (Bałazy et al., 2024): `ΔW = s·U_r S_r R V_rᵀ` with `U_r, S_r, V_r` from the truncated SVD of the
/// frozen weight and only the small `R: [r, r]` trained (`r²` parameters per layer, independent of the width).
///
/// Forward: `y = W x + s·(U_r S_r) R (V_rᵀ x)`, three skinny products. `R` starts at zero (`init_weights:
/// true`, the default: the model starts at the base and `∂R = s (U_r S_r)ᵀ G (V_rᵀ x)` is nonzero), or with
/// `init_weights: false` from `N(0, 10⁻⁵)` (the paper's small random init). `s = lora_alpha / r`.
/// The SVD factors are recomputed from the base weight when the adapter is created (they are not saved; the
/// file holds only `loraxs_R` `[r, r]` per layer, so it must be loaded on the same base model).
public final class LoRAXSLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// Trainable `[r, r]`.
    public let r: Tensor
    /// Frozen `U_r · diag(S_r)` `[out, r]`.
    let scaledU: Tensor
    /// Frozen `V_rᵀ` `[r, in]`.
    let vt: Tensor
    /// `lora_alpha / r`.
    public let scaling: Float
    let dropoutProbability: Float

    /// Decomposes the base weight; throws (naming `path`) when `rank > min(out, in)` or the SVD fails.
    public init(base: Linear, rank: Int, alpha: Float, dropout: Float, zeroInit: Bool, state: AdapterState, path: String) throws {
        let k = min(base.inFeatures, base.outFeatures)
        guard rank <= k else {
            throw GraftError.invalid("\(path): LoRA-XS rank \(rank) exceeds the layer's \(k) singular values (\(base.outFeatures)×\(base.inFeatures))")
        }
        self.state = state
        scaling = alpha / Float(rank)
        dropoutProbability = dropout
        let (u, s, vFull) = try svd(base.weight, what: "the weight of '\(path)'")
        let outF = base.outFeatures
        let us = Tensor(zeros: [outF, rank])
        for o in 0..<outF { for j in 0..<rank { us.pointer[o * rank + j] = u.pointer[o * k + j] * s.pointer[j] } }
        scaledU = us
        vt = vFull.slice(dim: 0, 0..<rank).copy()
        r = zeroInit ? Tensor(zeros: [rank, rank]).requiringGrad()
                     : Tensor.randomNormal([rank, rank], std: 1e-5, rng: &state.rng).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("loraxs_R", r)] }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state), vt)  // V_rᵀ x
        return y + linear(linear(h, r), scaledU) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { matmul(matmul(scaledU, r), vt) * scaling } }
}

/// LoRA-XS (`peft_type: "LORAXS"`, no PEFT counterpart): `r` (default 8), `lora_alpha` (default = r, s = 1),
/// `lora_dropout`, `init_weights` (true: R = 0; false: R ~ N(0, 10⁻⁵)).
public enum LoRAXSFactory: AdapterMethodFactory {
    public static let peftType = "LORAXS"
    public static let family = "weight-delta (SVD basis, r×r core)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "lora_alpha": 32, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let p = try config.double("lora_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'lora_dropout' must be in [0, 1), got \(p)") }
        _ = try config.bool("init_weights", default: true)
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (rank, alpha) = try rankAndAlpha(config, path: path, alphaKey: "lora_alpha")
        let alphaPatterns = try config.patternMap("alpha_pattern")
        let alphaValue = config.value("lora_alpha") == nil && alphaPatterns.isEmpty ? Float(rank) : alpha
        return try LoRAXSLayer(base: layer, rank: rank, alpha: alphaValue, dropout: Float(try config.double("lora_dropout", default: 0)),
                               zeroInit: try config.bool("init_weights", default: true), state: state, path: "\(config.source): \(path)")
    }
}
