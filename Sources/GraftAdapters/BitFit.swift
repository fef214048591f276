import GraftModels
import GraftTensor

/// BitFit (Ben Zaken et al., 2022): only bias terms train. Each targeted Linear gets a trainable bias change
/// `δb` `[out]`, zero at the start, so `y = W x + (b + δb)`; the weights never change and merging adds `δb` into
/// `b` exactly. Key `bitfit_bias` (Graft's; PEFT has no BitFit).
///
/// Layers without a bias (Llama's projections) get `δb` as a new, zero-initialised bias when
/// `add_missing_bias` is true (the default — otherwise a bias-free decoder would have nothing to train);
/// such a layer's adapter does not merge (there is no bias to merge into), and with `add_missing_bias: false` a
/// bias-free target is an error naming it. BitFit's LayerNorm biases are not included: add them with `LN_TUNING`
/// (which also trains the LayerNorm scales).
public final class BitFitLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The bias change `[out]`.
    public let bias: Tensor

    /// Creates the layer with `δb = 0`.
    public init(base: Linear, state: AdapterState) {
        self.state = state
        bias = Tensor(zeros: [base.outFeatures]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("bitfit_bias", bias)] }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor { y + bias }

    /// W does not change (zeros); the change is in ``deltaBias(base:)``.
    public func deltaWeight(base: Linear) -> Tensor? { Tensor(zeros: [base.outFeatures, base.inFeatures]) }

    public func deltaBias(base: Linear) -> Tensor? { bias.detached() }
}

/// BitFit (`peft_type: "BITFIT"`, no PEFT counterpart): `target_modules` (the Linear layers whose biases train),
/// `add_missing_bias` (default true: a bias-free layer gets a zero trainable bias).
public enum BitFitFactory: AdapterMethodFactory {
    public static let peftType = "BITFIT"
    public static let family = "selective (biases)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try config.bool("add_missing_bias", default: true)
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        if layer.bias == nil, !(try config.bool("add_missing_bias", default: true)) {
            throw GraftError.invalid("\(config.source): \(path) has no bias to train and 'add_missing_bias' is false")
        }
        return BitFitLayer(base: layer, state: state)
    }
}
