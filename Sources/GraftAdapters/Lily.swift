import Foundation
import GraftModels
import GraftTensor

/// Lily (low-rank interconnected adaptation across layers): each adapted layer projects its input with an `A`
/// shared by `stride_A` consecutive layers of the same target, routes the projection through its own router to
/// `num_B` expert up-projections shared by every layer of that target, and adds
/// `scaling · h (Σₑ p̄ₑ Bₑ)` with `h = A x` and `p̄` the router's softmax averaged over all tokens of the batch
/// (PEFT averages over the padded batch; Graft over the rows it computes: every padded row for padded batches,
/// the packed tokens when training). Not mergeable (ΔW depends on the batch). PEFT keys `lily_A.weight` `[r, in]`,
/// `lily_B.weight` `[num_B · r, out]`, `lily_router.weight` `[num_B, r]`, written under every layer that shares them.
public final class LilyLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[r, in]`, shared within a stride.
    public let a: Tensor
    /// `[num_B · r, out]`, shared by the target's layers.
    public let b: Tensor
    /// `[num_B, r]`, this layer's own.
    public let router: Tensor
    let experts: Int, rank: Int, outFeatures: Int
    let scaling: Float
    /// The router is averaged over the batch's tokens.
    public var couplesRows: Bool { true }

    init(base: Linear, rank: Int, experts: Int, scaling: Float, a: Tensor, b: Tensor, state: AdapterState) {
        self.state = state
        self.rank = rank
        self.experts = experts
        self.scaling = scaling
        outFeatures = base.outFeatures
        self.a = a
        self.b = b
        router = kaimingUniform(experts, rank, rng: &state.rng).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("lily_A.weight", a), ("lily_B.weight", b), ("lily_router.weight", router)]
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(x.reshaped([-1, layer.inFeatures]), a)
        let rows = h.shape[0]
        let probabilities = softmax(linear(h, router))
        let mean = matmul(Tensor(repeating: 1 / Float(max(rows, 1)), shape: [1, rows]), probabilities)
        let combined = matmul(mean, b.reshaped([experts, rank * outFeatures])).reshaped([rank, outFeatures])
        return y + (matmul(h, combined) * scaling).reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? { nil }
}

/// Lily (`peft_type: "LILY"`): `r`, `stride_A`, `num_B`, `scaling`, `init_weights` (B zero, or Kaiming-uniform).
public enum LilyFactory: AdapterMethodFactory {
    public static let peftType = "LILY"
    public static let family = "weight-delta (cross-layer shared experts, batch-routed)"
    public static var mergeable: Bool { false }
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "stride_A": 2, "num_B": 2, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        for (key, fallback) in [("r", 32), ("stride_A", 1), ("num_B", 2)] {
            let v = try config.int(key, default: fallback)
            guard v > 0 else { throw GraftError.invalid("\(config.source): '\(key)' must be positive, got \(v)") }
        }
    }

    /// The group a layer's A and B belong to: the target name it matched (PEFT: the last matching suffix) and its shape.
    static func group(_ path: String, layer: Linear, config: AdapterConfig) -> String {
        var suffix = "*"
        if case .names(let names) = config.targetModules {
            for n in names where path.hasSuffix(n) { suffix = n }
        }
        return "\(suffix) \(layer.outFeatures)x\(layer.inFeatures)"
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let r = try config.int("r", default: 32), stride = try config.int("stride_A", default: 1)
        let experts = try config.int("num_B", default: 2)
        let key = group(path, layer: layer, config: config)
        let position = state.integerTables["lily.count.\(key)"]?.first.map(Int.init) ?? 0
        state.integerTables["lily.count.\(key)"] = [Int32(position + 1)]
        // A for each stride's first layer, B for the group's first layer (PEFT draws one per layer, then shares).
        let aKey = "lily.A.\(key).\(position / stride)", bKey = "lily.B.\(key)"
        let a = state.sharedParameters[aKey] ?? kaimingUniform(r, layer.inFeatures, rng: &state.rng).requiringGrad()
        let initWeights = try config.bool("init_weights", default: true)
        let b = state.sharedParameters[bKey]
            ?? (initWeights ? Tensor(zeros: [experts * r, layer.outFeatures]) : kaimingUniform(experts * r, layer.outFeatures, rng: &state.rng)).requiringGrad()
        state.sharedParameters[aKey] = a
        state.sharedParameters[bKey] = b
        return LilyLayer(base: layer, rank: r, experts: experts, scaling: Float(try config.double("scaling", default: 1)),
                         a: a, b: b, state: state)
    }
}
