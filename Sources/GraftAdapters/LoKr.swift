import GraftModels
import GraftTensor

/// LoKr (Edalati et al.; LyCORIS): a Kronecker product, `ΔW = (α/r) · W1 ⊗ W2`, where `W1` is
/// `[out_l, in_m]` and `W2` is `[out_k, in_n]` for the factorizations `out = out_l·out_k`, `in = in_m·in_n`;
/// either factor may itself be low rank (`W1 = W1a W1b`, `W2 = W2a W2b`). PEFT keys `lokr_w1` or
/// `lokr_w1_a`/`lokr_w1_b`, and `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`.
public final class LoKrLayer: DenseDeltaMethod {
    public let state: AdapterState
    /// The factors by PEFT key, in PEFT's order.
    public let factors: [(name: String, tensor: Tensor)]
    /// `α / r`.
    public let scaling: Float

    /// Creates the layer as PEFT does: `W1` (or `W1a`) zero so ΔW = 0, the rest Kaiming-uniform.
    public init(base: Linear, rank: Int, alpha: Float, decomposeBoth: Bool, factor: Int, state: AdapterState) {
        self.state = state
        scaling = alpha / Float(rank)
        let (inM, inN) = LoKrLayer.factorization(base.inFeatures, factor: factor)
        let (outL, outK) = LoKrLayer.factorization(base.outFeatures, factor: factor)
        let useW1 = !(decomposeBoth && Double(rank) < Double(max(outL, inM)) / 2)
        let useW2 = !(Double(rank) < Double(max(outK, inN)) / 2)
        var f: [(String, Tensor)] = []
        if useW1 {
            f.append(("lokr_w1", Tensor(zeros: [outL, inM]).requiringGrad()))
        } else {
            f.append(("lokr_w1_a", Tensor(zeros: [outL, rank]).requiringGrad()))
            f.append(("lokr_w1_b", kaimingUniform(rank, inM, rng: &state.rng).requiringGrad()))
        }
        if useW2 {
            f.append(("lokr_w2", kaimingUniform(outK, inN, rng: &state.rng).requiringGrad()))
        } else {
            f.append(("lokr_w2_a", kaimingUniform(outK, rank, rng: &state.rng).requiringGrad()))
            f.append(("lokr_w2_b", kaimingUniform(rank, inN, rng: &state.rng).requiringGrad()))
        }
        factors = f
    }

    /// PEFT's `factorization`: `(m, n)` with `m·n = dimension`, `m ≤ n`, `m` as close to `√dimension` (or to
    /// `factor` when positive and dividing) as possible.
    static func factorization(_ dimension: Int, factor: Int) -> (Int, Int) {
        if factor > 0 && dimension % factor == 0 { return (factor, dimension / factor) }
        let limit = factor == -1 || factor <= 0 ? dimension : factor
        var (m, n) = (1, dimension)
        var length = m + n
        while m < n {
            var newM = m + 1
            while dimension % newM != 0 { newM += 1 }
            let newN = dimension / newM
            if newM + newN > length || newM > limit { break }
            (m, n) = (newM, newN)
            length = m + n
        }
        return m > n ? (n, m) : (m, n)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { factors }

    private func factor(_ name: String) -> Tensor? { factors.first { $0.name == name }?.tensor }

    /// ΔW, recorded for autograd.
    public func delta() -> Tensor {
        let w1 = factor("lokr_w1") ?? matmul(factor("lokr_w1_a") ?? Tensor(zeros: [1, 1]), factor("lokr_w1_b") ?? Tensor(zeros: [1, 1]))
        let w2 = factor("lokr_w2") ?? matmul(factor("lokr_w2_a") ?? Tensor(zeros: [1, 1]), factor("lokr_w2_b") ?? Tensor(zeros: [1, 1]))
        return kron(w1, w2) * scaling
    }

    public func load(_ name: String, from tensor: Tensor) throws {
        guard let target = factor(name) else {
            throw GraftError.format("LoKr tensor '\(name)' does not exist for this layer (have \(factors.map(\.name).joined(separator: ", ")); check r, decompose_both, decompose_factor)")
        }
        try copyParameter(name, into: target, from: tensor)
    }
}

/// LoKr (`peft_type: "LOKR"`): `r`, `alpha`, `decompose_both`, `decompose_factor`, rank/alpha patterns.
public enum LoKrFactory: AdapterMethodFactory {
    public static let peftType = "LOKR"
    public static let family = "weight-delta (Kronecker)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "alpha": 16, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        try rejectUnsupported(config, ["use_effective_conv2d"], rankDropout: true)
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "alpha")
        return LoKrLayer(base: layer, rank: r, alpha: alpha, decomposeBoth: try config.bool("decompose_both", default: false),
                         factor: try config.int("decompose_factor", default: -1), state: state)
    }
}
