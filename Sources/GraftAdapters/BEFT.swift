import GraftModels
import GraftTensor

/// BEFT (bias-efficient fine-tuning): a trainable bias added to each adapted layer's output, `y = W x + b + β`.
/// It merges into the base bias, so layers without a bias cannot merge (as in PEFT). PEFT key `beft_bias` `[1, out]`.
public final class BEFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[1, out]` (zero at PEFT's default initialization, N(0, 1) with `init_weights: false`).
    public let bias: Tensor
    let outFeatures: Int

    init(base: Linear, initWeights: Bool, state: AdapterState) {
        self.state = state
        outFeatures = base.outFeatures
        bias = (initWeights ? Tensor(zeros: [1, base.outFeatures]) : Tensor.randomNormal([1, base.outFeatures], rng: &state.rng)).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("beft_bias", bias)] }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        y + bias.reshaped([outFeatures])
    }

    /// Zero when the layer has a bias to merge into; nil (not mergeable) otherwise, as PEFT refuses that merge.
    public func deltaWeight(base: Linear) -> Tensor? {
        base.bias == nil ? nil : Tensor(zeros: [base.outFeatures, base.inFeatures])
    }

    public func deltaBias(base: Linear) -> Tensor? { withNoGrad { bias.reshaped([outFeatures]).copy() } }
}

/// BEFT (`peft_type: "BEFT"`): `init_weights`.
public enum BEFTFactory: AdapterMethodFactory {
    public static let peftType = "BEFT"
    public static let family = "additive (output bias)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {}

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        BEFTLayer(base: layer, initWeights: try config.bool("init_weights", default: true), state: state)
    }
}
