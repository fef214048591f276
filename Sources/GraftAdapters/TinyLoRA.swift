import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// TinyLoRA: LoRA-XS with its `r × r` core replaced by a tiny vector, `ΔW = B R A` with `R = Σᵢ vᵢ Pᵢ`. `A`
/// (`√S V` rows, `[r, in]`) and `B` (`U √S` columns, `[out, r]`) are the frozen truncated SVD of the base
/// weight; `P: [u, r, r]` are frozen N(0, 1/r) projections drawn per layer from `projection_seed + layer index`
/// with PyTorch's generator (``TorchGenerator``); `v: [u]` is trainable and shared by a group of layers
/// (`weight_tying`). PEFT keys: per layer `tinylora_A`, `tinylora_B`, `tinylora_P` (with `save_projection`),
/// shared `base_model.tinylora_v.<group>`.
public final class TinyLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// Frozen `[r, in]`.
    public let a: Tensor
    /// Frozen `[out, r]`.
    public let b: Tensor
    /// Frozen projections `[u, r, r]`.
    public let projections: Tensor
    /// The group's trainable vector `[u]` (a shared tensor).
    public let v: Tensor
    let rank: Int
    let saveProjection: Bool
    let dropoutProbability: Float

    init(base: Linear, rank requested: Int, v: Tensor, seed: UInt64, saveProjection: Bool, dropout: Float,
         state: AdapterState, path: String) throws {
        self.state = state
        self.v = v
        self.saveProjection = saveProjection
        dropoutProbability = dropout
        let (u, s, vt) = try svd(base.weight, what: path)
        let r = min(requested, s.count)
        rank = r
        let roots = s.scalars.prefix(r).map { $0.squareRoot() }
        let inF = base.inFeatures, outF = base.outFeatures
        let aT = Tensor(zeros: [r, inF]), bT = Tensor(zeros: [outF, r])
        for i in 0..<r {
            for j in 0..<inF { aT.pointer[i * inF + j] = roots[i] * vt.pointer[i * inF + j] }
        }
        for o in 0..<outF {
            for i in 0..<r { bT.pointer[o * r + i] = u.pointer[o * u.shape[1] + i] * roots[i] }
        }
        a = aT
        b = bT
        var g = TorchGenerator(seed: seed)
        let count = v.count
        projections = Tensor(shape: [count, r, r], values: g.normal(count * r * r, std: 1 / Double(r).squareRoot()))
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [] }

    public var savedBuffers: [(name: String, tensor: Tensor)] {
        [("tinylora_A", a), ("tinylora_B", b)] + (saveProjection ? [("tinylora_P", projections)] : [])
    }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {
        switch name {
        case "tinylora_A": try copyParameter(name, into: a, from: tensor)
        case "tinylora_B": try copyParameter(name, into: b, from: tensor)
        case "tinylora_P": try copyParameter(name, into: projections, from: tensor)
        default: break
        }
    }

    /// `R = Σᵢ vᵢ Pᵢ` `[r, r]`, recorded for autograd through `v`.
    func core() -> Tensor {
        matmul(v.reshaped([1, v.count]), projections.reshaped([v.count, rank * rank])).reshaped([rank, rank])
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state), a)
        return y + linear(linear(h, core()), b)
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { matmul(matmul(b, core()), a) } }
}

/// TinyLoRA (`peft_type: "TINYLORA"`): `r`, `u`, `weight_tying`, `projection_seed`, `save_projection`,
/// `init_v_bound`, `init_weights` (`true`: v = 0; `"uniform"` or `false`: v ~ U(−bound, bound), where PEFT leaves
/// `false` uninitialized), `tinylora_dropout`.
public enum TinyLoRAFactory: AdapterMethodFactory {
    public static let peftType = "TINYLORA"
    public static let family = "weight-delta (frozen SVD, tied random core)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 2, "u": 64, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 2), u = try config.int("u", default: 64)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        guard u > 0 else { throw GraftError.invalid("\(config.source): 'u' must be positive, got \(u)") }
        let tying = try config.double("weight_tying", default: 0)
        guard tying >= 0, tying <= 1 else { throw GraftError.invalid("\(config.source): 'weight_tying' must be in [0, 1], got \(tying)") }
        let p = try config.double("tinylora_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'tinylora_dropout' must be in [0, 1), got \(p)") }
        guard try config.int("projection_seed", default: 42) >= 0 else {
            throw GraftError.invalid("\(config.source): 'projection_seed' must be non-negative")
        }
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): 'bias' = \(bias) is not supported (only \"none\")")
        }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
        _ = try zeroInit(config)
    }

    static func zeroInit(_ config: AdapterConfig) throws -> Bool {
        switch config.value("init_weights") {
        case nil: return true
        case let s as String where s == "uniform": return false
        case let v?:
            guard let flag = JSONScalar.bool(v) else {
                throw GraftError.invalid("\(config.source): 'init_weights' must be true, false or \"uniform\", got \(v)")
            }
            return flag
        }
    }

    /// PEFT's groups: `round(n (1 − weight_tying))` of them (at least 1, Python's half-to-even rounding), each
    /// `n / groups` consecutive layers, the last taking the remainder.
    static func groups(layers n: Int, tying: Double) -> (count: Int, size: Int) {
        let count = max(1, Int((Double(n) * (1 - tying)).rounded(.toNearestOrEven)))
        return (count, max(1, n / count))
    }

    /// The shared vectors `base_model.tinylora_v.<group>`; records each layer's position among the targets.
    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let u = try config.int("u", default: 64)
        let (count, _) = groups(layers: layers.count, tying: try config.double("weight_tying", default: 0))
        for (i, l) in layers.enumerated() { state.targetIndex[ObjectIdentifier(l)] = i }
        let bound = Float(try config.double("init_v_bound", default: 0.02))
        let zero = try zeroInit(config)
        return (0..<count).map { g in
            let v = zero ? Tensor(zeros: [u]) : Tensor.randomUniform([u], low: -bound, high: bound, rng: &state.rng)
            return ("base_model.tinylora_v.\(g)", v.requiringGrad())
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let index = state.targetIndex[ObjectIdentifier(layer)] else {
            throw GraftError(.internalError, "TinyLoRA: '\(path)' is not among the adapter's targets")
        }
        let (count, size) = groups(layers: state.targetIndex.count, tying: try config.double("weight_tying", default: 0))
        let group = min(index / size, count - 1)
        guard let v = shared["base_model.tinylora_v.\(group)"] else {
            throw GraftError(.internalError, "TinyLoRA: vector \(group) was not created")
        }
        return try TinyLoRALayer(base: layer, rank: try config.int("r", default: 2), v: v,
                                 seed: UInt64(try config.int("projection_seed", default: 42) + index),
                                 saveProjection: try config.bool("save_projection", default: true),
                                 dropout: Float(try config.double("tinylora_dropout", default: 0)),
                                 state: state, path: "\(config.source): \(path)")
    }
}
