import GraftModels
import GraftTensor

/// RoAd (Liao et al., 2024): 2-D rotations with scales on the output, pairing element `j` of each group's first
/// half with element `j` of its second half: `y' = y ⊙ (α cos θ) + rotate_half(y) ⊙ (α sin θ)`, where
/// `rotate_half` maps a group's halves `(y₁, y₂)` to `(−y₂, y₁)`. Variants share θ, α across the pair
/// (`road_1`, `[out/2]`), keep one per element (`road_2`, `[out]`), or separate cos/sin parameters
/// (`road_4`, `[2·out]`). PEFT keys `road_theta`, `road_alpha`.
public final class RoAdLayer: LinearAdapterMethod {
    public let state: AdapterState
    public let theta: Tensor, alpha: Tensor
    let variant: String
    let groupSize: Int, outFeatures: Int

    init(base: Linear, variant: String, groupSize: Int, state: AdapterState) throws {
        guard groupSize > 0, groupSize % 2 == 0, base.outFeatures % groupSize == 0 else {
            throw GraftError.invalid("RoAd group_size \(groupSize) must be even and divide out_features \(base.outFeatures)")
        }
        self.state = state
        self.variant = variant
        self.groupSize = groupSize
        outFeatures = base.outFeatures
        let size: Int
        switch variant {
        case "road_1": size = base.outFeatures / 2
        case "road_2": size = base.outFeatures
        case "road_4": size = base.outFeatures * 2
        default: throw GraftError.invalid("RoAd variant '\(variant)' is not one of road_1, road_2, road_4")
        }
        theta = Tensor(zeros: [size]).requiringGrad()
        alpha = Tensor(repeating: 1, shape: [size]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("road_theta", theta), ("road_alpha", alpha)] }

    /// The per-output multipliers of `y` and of `rotate_half(y)`, `[out]` each, recorded.
    private func columns() -> (Tensor, Tensor) {
        switch variant {
        case "road_1":
            // Element p of group g uses pair index g·(G/2) + p mod (G/2).
            let half = groupSize / 2
            let index = (0..<outFeatures).map { Int32(($0 / groupSize) * half + $0 % half) }
            let t = embedding(index, table: theta.reshaped([theta.count, 1])).reshaped([outFeatures])
            let a = embedding(index, table: alpha.reshaped([alpha.count, 1])).reshaped([outFeatures])
            return (a * cos(t), a * sin(t))
        case "road_4":
            let t = theta.reshaped([-1, 2, groupSize]), a = alpha.reshaped([-1, 2, groupSize])
            let t0 = t.slice(dim: 1, 0..<1).reshaped([outFeatures]), t1 = t.slice(dim: 1, 1..<2).reshaped([outFeatures])
            let a0 = a.slice(dim: 1, 0..<1).reshaped([outFeatures]), a1 = a.slice(dim: 1, 1..<2).reshaped([outFeatures])
            return (a0 * cos(t0), a1 * sin(t1))
        default:
            return (alpha * cos(theta), alpha * sin(theta))
        }
    }

    /// Applies the rotation to the last dimension of `y`.
    private func rotate(_ y: Tensor) -> Tensor {
        let (first, second) = columns()
        let half = groupSize / 2
        let grouped = y.reshaped([-1, 2, half])
        let rotated = concat([grouped.slice(dim: 1, 1..<2) * -1, grouped.slice(dim: 1, 0..<1)], dim: 1).reshaped(y.shape)
        return y * first + rotated * second
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor { rotate(y) }

    public func deltaWeight(base: Linear) -> Tensor? {
        // R W: rotate each column of W (rows of Wᵀ).
        withNoGrad { rotate(base.weight.transposed(0, 1)).transposed(0, 1) - base.weight }
    }

    public func deltaBias(base: Linear) -> Tensor? {
        guard let b = base.bias else { return nil }
        return withNoGrad { rotate(b.reshaped([1, b.count])).reshaped([b.count]) - b }
    }
}

/// RoAd (`peft_type: "ROAD"`): `variant` (`road_1`, `road_2`, `road_4`), `group_size`.
public enum RoAdFactory: AdapterMethodFactory {
    public static let peftType = "ROAD"
    public static let family = "multiplicative (2-D rotations)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["variant": "road_1", "group_size": 64, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {}

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        do {
            return try RoAdLayer(base: layer, variant: try config.string("variant") ?? "road_1",
                                 groupSize: try config.int("group_size", default: 64), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
