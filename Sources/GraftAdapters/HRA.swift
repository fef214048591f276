import GraftModels
import GraftTensor

/// HRA (Yuan et al., 2024): the weight is multiplied by a chain of Householder reflections,
/// `W' = W · H₀ H₁ ⋯ H_{r−1}` with `Hᵢ = I − 2 uᵢ uᵢᵀ` (columns of `U` normalized). Applied to the input
/// instead of forming `W'`: `x' = x H_{r−1} ⋯ H₀`, then `y = W x' + b`, O(N·in·r). PEFT key `hra_u` `[in, r]`.
public final class HRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The reflection vectors, `[in, r]`.
    public let u: Tensor
    let rank: Int

    /// Creates the layer as PEFT does with `init_weights`: pairs of identical columns (H H = I, the identity).
    public init(base: Linear, rank: Int, state: AdapterState) {
        self.state = state
        self.rank = rank
        let half = Tensor.randomUniform([base.inFeatures, (rank + 1) / 2], low: -1, high: 1, rng: &state.rng)
        let values = (0..<base.inFeatures).flatMap { i in (0..<rank).map { j in half.pointer[i * half.shape[1] + j / 2] } }
        u = Tensor(shape: [base.inFeatures, rank], values: values).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("hra_u", u)] }

    /// `U` with unit columns, recorded.
    private func normalized() -> Tensor {
        let ones = Tensor(repeating: 1, shape: [1, u.shape[0]])
        let norms = sqrt(matmul(ones, u * u))  // [1, r]
        return u * reciprocal(norms)
    }

    /// `x H_{r−1} ⋯ H₀` for rows of `x` (`[..., in]`).
    private func reflect(_ x: Tensor) -> Tensor {
        let un = normalized()
        let shape = x.shape
        var h = x.reshaped([-1, u.shape[0]])
        for i in stride(from: rank - 1, through: 0, by: -1) {
            let ui = un.slice(dim: 1, i..<(i + 1))  // [in, 1]
            h = h - matmul(matmul(h, ui), ui, transposeB: true) * 2
        }
        return h.reshaped(shape)
    }

    public func transformInput(_ x: Tensor, layer: Linear) -> Tensor { reflect(x) }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor { y }

    public func deltaWeight(base: Linear) -> Tensor? {
        // W' = W R where x Rᵀ = reflect(x); so W' = reflect(W) row by row transposed twice: (reflect(W)) since
        // W' rows are w H₀⋯: use Rᵀ's action on rows of W: W R = (Rᵀ Wᵀ)ᵀ, and row w of W gives w R.
        withNoGrad {
            let un = normalized()
            var h = base.weight
            for i in 0..<rank {
                let ui = un.slice(dim: 1, i..<(i + 1))
                h = h - matmul(matmul(h, ui), ui, transposeB: true) * 2
            }
            return h - base.weight
        }
    }
}

/// HRA (`peft_type: "HRA"`): `r` (even for the identity initialization); `apply_GS` is not supported yet.
public enum HRAFactory: AdapterMethodFactory {
    public static let peftType = "HRA"
    public static let family = "orthogonal (Householder reflections)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        try rejectUnsupported(config, ["apply_GS"], rankDropout: false)
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): bias '\(bias)' is not supported (only \"none\")")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, _) = try rankAndAlpha(config, path: path, alphaKey: "alpha")
        return HRALayer(base: layer, rank: r, state: state)
    }
}
