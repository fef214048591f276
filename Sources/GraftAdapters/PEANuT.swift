import GraftModels
import GraftTensor

/// PEANuT (parameter-efficient adaptation with weight-aware neural tweakers): ΔW is a small network applied to the
/// frozen weight itself, `ΔWᵀ = s · B(g(f(Wᵀ Aᵀ)))`, `A: [r, out]`, `B: [out, r]`, where `g` runs `depth`
/// encoder layers `f(E·)` then `depth` decoder layers `f(D·)` with residuals (U-Net style), `f` the activation.
/// The network's output `Z: [in, r]` does not depend on the input, so the forward is `y + s (x Z) Bᵀ` without
/// forming ΔW. PEFT keys `peanut_A.weight`, `peanut_B.weight`, `peanut_encoders.<i>.weight`, `peanut_decoders.<i>.weight`.
public final class PEANuTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[r, out]`.
    public let a: Tensor
    /// `[out, r]` (zero at PEFT's default initialization).
    public let b: Tensor
    /// `depth` encoder and decoder layers, each `[r, r]`.
    public let encoders: [Tensor], decoders: [Tensor]
    let activation: PEANuTActivation
    let scaling: Float

    init(base: Linear, rank: Int, depth: Int, activation: PEANuTActivation, scaling: Float, initWeights: Bool, state: AdapterState) {
        self.state = state
        self.activation = activation
        self.scaling = scaling
        a = kaimingUniform(rank, base.outFeatures, rng: &state.rng).requiringGrad()
        encoders = (0..<depth).map { _ in kaimingUniform(rank, rank, rng: &state.rng).requiringGrad() }
        decoders = (0..<depth).map { _ in kaimingUniform(rank, rank, rng: &state.rng).requiringGrad() }
        b = (initWeights ? Tensor(zeros: [base.outFeatures, rank]) : kaimingUniform(base.outFeatures, rank, rng: &state.rng)).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("peanut_A.weight", a), ("peanut_B.weight", b)]
            + encoders.enumerated().map { ("peanut_encoders.\($0.offset).weight", $0.element) }
            + decoders.enumerated().map { ("peanut_decoders.\($0.offset).weight", $0.element) }
    }

    /// `Z = g(f(Wᵀ Aᵀ))` `[in, r]`, recorded for autograd.
    func tweaked(_ weight: Tensor) -> Tensor {
        var z = activation.apply(matmul(weight, a, transposeA: true, transposeB: true))
        var residuals: [Tensor] = []
        for e in encoders {
            residuals.append(z)
            z = activation.apply(linear(z, e))
        }
        for (i, d) in decoders.enumerated() {
            z = activation.apply(linear(z, d)) + residuals[residuals.count - 1 - i]
        }
        return z
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let z = tweaked(layer.weight)
        let h = matmul(x.reshaped([-1, layer.inFeatures]), z)
        return y + (linear(h, b) * scaling).reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(b, tweaked(base.weight), transposeB: true) * scaling }
    }
}

/// The activations PEANuT's `act_fn` names (transformers' `ACT2FN` keys Graft implements).
enum PEANuTActivation: String {
    case relu, gelu, silu, swish, tanh, sigmoid, linear

    func apply(_ x: Tensor) -> Tensor {
        switch self {
        case .relu: return GraftTensor.relu(x)
        case .gelu: return GraftTensor.gelu(x)
        case .silu, .swish: return GraftTensor.silu(x)
        case .tanh: return GraftTensor.tanh(x)
        case .sigmoid: return GraftTensor.sigmoid(x)
        case .linear: return x
        }
    }
}

/// PEANuT (`peft_type: "PEANUT"`): `r`, `depth`, `act_fn`, `scaling`, `init_weights`.
public enum PEANuTFactory: AdapterMethodFactory {
    public static let peftType = "PEANUT"
    public static let family = "weight-delta (weight-aware network)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "depth": 1, "target_modules": targets] }

    static func activation(_ config: AdapterConfig) throws -> PEANuTActivation {
        let name = try config.string("act_fn") ?? "relu"
        guard let act = PEANuTActivation(rawValue: name) else {
            throw GraftError(.unsupported, "\(config.source): 'act_fn' = \"\(name)\" is not supported (use relu, gelu, silu, swish, tanh, sigmoid or linear)")
        }
        return act
    }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 32), depth = try config.int("depth", default: 0)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        guard depth >= 0 else { throw GraftError.invalid("\(config.source): 'depth' must be non-negative, got \(depth)") }
        _ = try activation(config)
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        PEANuTLayer(base: layer, rank: try config.int("r", default: 32), depth: try config.int("depth", default: 0),
                    activation: try activation(config), scaling: Float(try config.double("scaling", default: 1)),
                    initWeights: try config.bool("init_weights", default: true), state: state)
    }
}
