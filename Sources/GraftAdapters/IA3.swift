import GraftModels
import GraftTensor

/// IA³ (Liu et al., 2022): learned rescaling vectors. On feed-forward layers the input is scaled,
/// `y = W (l ⊙ x) + b`; elsewhere the output is, `y = l ⊙ (W x + b)`. PEFT key `ia3_l` (`[1, in]` or `[out, 1]`).
public final class IA3Layer: LinearAdapterMethod {
    public let state: AdapterState
    /// The scaling vector, stored in PEFT's shape.
    public let scale: Tensor
    /// True when the input (not the output) is scaled.
    public let isFeedForward: Bool

    /// Creates the layer with PEFT's default initialization (ones: the identity), or, with `initOnes` false
    /// (PEFT's `init_ia3_weights: false`), standard normal values as PEFT's `torch.randn` leaves them.
    public init(base: Linear, feedForward: Bool, state: AdapterState, initOnes: Bool = true) {
        self.state = state
        isFeedForward = feedForward
        let shape = feedForward ? [1, base.inFeatures] : [base.outFeatures, 1]
        scale = (initOnes ? Tensor(repeating: 1, shape: shape) : Tensor.randomNormal(shape, rng: &state.rng)).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("ia3_l", scale)] }

    private var vector: Tensor { scale.reshaped([scale.count]) }

    public func transformInput(_ x: Tensor, layer: Linear) -> Tensor {
        isFeedForward ? x * vector : x
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        isFeedForward ? y : y * vector
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let l = add(scale, -1)  // [out, 1] scales rows, [1, in] scales columns
            return base.weight * l
        }
    }

    public func deltaBias(base: Linear) -> Tensor? {
        guard !isFeedForward, let b = base.bias else { return nil }
        return withNoGrad { b * add(vector, -1) }
    }
}

/// IA³ (`peft_type: "IA3"`): `target_modules`, `feedforward_modules` (a subset whose input is scaled),
/// `init_ia3_weights` (true: ones; false: standard normal, as PEFT).
public enum IA3Factory: AdapterMethodFactory {
    public static let peftType = "IA3"
    public static let family = "multiplicative (rescaling)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["target_modules": targets, "feedforward_modules": [String]()] }

    public static func validate(_ config: AdapterConfig) throws {
        if let ff = config.value("feedforward_modules"), !(ff is [String]) && !(ff is String) && !(ff is NSNull) {
            throw GraftError.invalid("\(config.source): 'feedforward_modules' must be a list of names or a regex")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let feedForward = TargetMatcher.subsetSelects(config.value("feedforward_modules"), path: path) ?? false
        return IA3Layer(base: layer, feedForward: feedForward, state: state,
                        initOnes: try config.bool("init_ia3_weights", default: true))
    }
}

import Foundation
