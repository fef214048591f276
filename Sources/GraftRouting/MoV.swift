import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

/// MoV (Zadouri et al., 2023, "Pushing Mixture of Experts to the Limit", seed #2): a soft mixture of `E` (IA)³
/// vector experts in one Linear layer. Per token, a router over the layer's input gives `s = softmax(x W_r)` and
/// the (IA)³ vector is `l = Σᵢ sᵢ lᵢ`: the output is scaled, `y = (W x + b) ⊙ l` (keys, values), or on
/// feed-forward modules the input, `y = W (l ⊙ x) + b` (the FFN's intermediate activation, as (IA)³ does).
///
/// With one expert the router's softmax is 1 and MoV is (IA)³ with vector `l₁`. Parameters (Graft keys, no PEFT
/// equivalent): `router.weight` `[E, in]`, `mov_l` `[E, out]` (`[E, in]` on feed-forward modules), the vectors
/// starting at ones (the identity) and the router Kaiming-uniform (bound `1/√in`). Every forward updates
/// ``statistics``. Not mergeable (the vector depends on the token).
public final class MoVLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The module path (for statistics).
    public let path: String
    /// Router `[E, in]`.
    public let router: Tensor
    /// The expert vectors `[E, width]`.
    public let vectors: Tensor
    /// True when the input (not the output) is scaled.
    public let isFeedForward: Bool
    /// Router statistics since the last reset.
    public internal(set) var statistics: RouterLayerStatistics

    /// `experts` vector experts on `base` (input-scaling when `feedForward`), ones unless `initOnes` is false
    /// (then standard normal, as (IA)³'s `init_ia3_weights: false`).
    public init(base: Linear, path: String, experts: Int, feedForward: Bool, initOnes: Bool, state: AdapterState) {
        self.state = state
        self.path = path
        isFeedForward = feedForward
        let bound = 1 / Float(base.inFeatures).squareRoot()
        router = Tensor.randomUniform([experts, base.inFeatures], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        let shape = [experts, feedForward ? base.inFeatures : base.outFeatures]
        vectors = (initOnes ? Tensor(repeating: 1, shape: shape) : Tensor.randomNormal(shape, rng: &state.rng)).requiringGrad()
        statistics = RouterLayerStatistics(path: path, experts: experts)
    }

    /// Vector experts `E`.
    public var experts: Int { router.shape[0] }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("router.weight", router), ("mov_l", vectors)] }

    public func deltaWeight(base: Linear) -> Tensor? { nil }

    /// Each token's merged vector `softmax(x W_r) · L`, `[T, width]` for `x` `[T, in]`, recorded for autograd.
    func mixedVectors(_ x2: Tensor) -> Tensor {
        let probs = softmax(linear(x2, router))
        let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: probs.pointer, count: probs.count), tokens: x2.rows,
                                  experts: experts, mode: .soft, topK: experts, topP: 1, capacityFactor: nil)
        statistics.record(probs: probs, gates: probs, plan: plan)
        return matmul(probs, vectors)
    }

    public func transformInput(_ x: Tensor, layer: Linear) -> Tensor {
        guard isFeedForward, x.rows > 0 else { return x }
        let x2 = x.reshaped([x.rows, x.lastDim])
        return (x2 * mixedVectors(x2)).reshaped(x.shape)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        guard !isFeedForward, x.rows > 0 else { return y }
        let x2 = x.reshaped([x.rows, x.lastDim])
        return y * mixedVectors(x2).reshaped(y.shape)
    }
}

/// MoV (`peft_type: "MOV"`, Graft's own type): a soft mixture of (IA)³ vector experts on each targeted Linear.
/// Keys: `target_modules` (the paper's keys, values and FFN: `["k_proj", "v_proj", "down_proj"]` on Llama,
/// `["key", "value", "output.dense"]` on BERT), `feedforward_modules` (the subset whose input is scaled, as
/// (IA)³), `num_experts` (10, the paper's smallest MoV), `init_ia3_weights` (true: ones).
public enum MoVFactory: AdapterMethodFactory {
    public static let peftType = "MOV"
    public static let family = "soft mixture of (IA)³ vector experts (MoV)"
    public static let mergeable = false

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["num_experts": 4, "target_modules": targets, "feedforward_modules": [String]()]
    }

    public static func validate(_ config: AdapterConfig) throws {
        try IA3Factory.validate(config)
        let e = try config.int("num_experts", default: 10)
        guard e >= 1 else { throw GraftError.invalid("\(config.source): 'num_experts' must be ≥ 1, got \(e)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let feedForward = TargetMatcher.subsetSelects(config.value("feedforward_modules"), path: path) ?? false
        return MoVLayer(base: layer, path: path, experts: try config.int("num_experts", default: 10), feedForward: feedForward,
                        initOnes: try config.bool("init_ia3_weights", default: true), state: state)
    }
}
