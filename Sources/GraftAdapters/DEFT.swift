import Foundation
import GraftModels
import GraftTensor

/// DEFT (decomposed fine-tuning): the base weight's output is projected off a learned rank-`r` subspace and a new
/// component added in it, `W' = (I − Q_P rightᵀ) W + Q_P (s R)`, with `P: [out, r]` and, for
/// `decomposition_method: "relu"`, `Q_P = P`, `right = relu(P)`. The forward corrects the base product,
/// `y − ((y − b) right) Q_Pᵀ + (x (s R)ᵀ) Q_Pᵀ`, never forming the `out × out` projection or ΔW. With `para`
/// (PaRa) there is no R. `s = alpha / r` when `alpha` is set, else 1. PEFT keys `deft_P` `[out, r]`, `deft_R` `[r, in]`.
public final class DEFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[out, r]` (N(0, 0.02²) at initialization).
    public let p: Tensor
    /// `[r, in]`, or nil for PaRa. PEFT initializes it to `relu(P)ᵀ W / s` so the adapter starts as the identity.
    public let r: Tensor?
    let scaling: Float
    let dropoutProbability: Float

    init(base: Linear, rank requested: Int, para: Bool, scaling: Float, initWeights: Bool, initScale: Float,
         dropout: Float, state: AdapterState) {
        self.state = state
        self.scaling = scaling
        dropoutProbability = dropout
        let rank = min(requested, base.outFeatures)
        let pInit = Tensor.randomNormal([base.outFeatures, rank], std: 0.02, rng: &state.rng)
        p = pInit.requiringGrad()
        if para {
            r = nil
        } else if initWeights {
            r = withNoGrad { matmul(GraftTensor.relu(pInit), base.weight, transposeA: true) * (1 / scaling) }.requiringGrad()
        } else {
            r = Tensor.randomNormal([rank, base.inFeatures], std: 0.02 * initScale, rng: &state.rng).requiringGrad()
        }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("deft_P", p)] + (r.map { [("deft_R", $0)] } ?? [])
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let outF = layer.outFeatures
        let y2 = y.reshaped([-1, outF])
        let product = layer.bias.map { y2 - $0 } ?? y2
        var out = y2 - matmul(matmul(product, GraftTensor.relu(p)), p, transposeB: true)
        if let r {
            let xd = dropout(x, p: dropoutProbability, state: state).reshaped([-1, layer.inFeatures])
            out = out + matmul(linear(xd, r * scaling), p, transposeB: true)
        }
        return out.reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let factor = matmul(GraftTensor.relu(p), base.weight, transposeA: true)
            return matmul(p, (r.map { $0 * scaling - factor }) ?? (factor * -1))
        }
    }
}

/// DEFT (`peft_type: "DEFT"`): `r`, `alpha`, `para`, `decomposition_method` (`"relu"`; `"qr"` is rejected),
/// `init_weights`, `init_scale`, `deft_dropout`.
public enum DEFTFactory: AdapterMethodFactory {
    public static let peftType = "DEFT"
    public static let family = "weight-delta (output-subspace projection)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let method = try config.string("decomposition_method") ?? "relu"
        guard method == "relu" else {
            throw GraftError(.unsupported, "\(config.source): 'decomposition_method' = \"\(method)\" is not supported (only \"relu\"; Graft has no differentiable QR)")
        }
        try validateDropoutBiasAndLayout(config, dropoutKey: "deft_dropout")
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let r = try config.int("r", default: 8)
        let alphaValue = config.value("alpha")
        let alpha = alphaValue == nil || alphaValue is NSNull ? 0 : try config.double("alpha", default: 0)
        // PEFT: scaling = alpha / r when alpha is truthy (r clipped to out_features first), else 1.
        let scaling = alpha != 0 ? Float(alpha / Double(min(r, layer.outFeatures))) : 1
        return DEFTLayer(base: layer, rank: r, para: try config.bool("para", default: false), scaling: scaling,
                         initWeights: try config.bool("init_weights", default: true),
                         initScale: Float(try config.double("init_scale", default: 1)),
                         dropout: Float(try config.double("deft_dropout", default: 0)), state: state)
    }
}
