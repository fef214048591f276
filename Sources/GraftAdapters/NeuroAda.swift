import GraftModels
import GraftTensor

/// NeuroAda (Zhang et al., 2025): for every output neuron (row of W) the `k` input connections with the largest
/// |W| get a trainable bypass `δ`, zero at the start, so `y = W x + b + Δ x` with Δ nonzero only on those
/// `out · k` entries (a ``SparseDelta``; the weights stay frozen). Ties in |W| go to the lower column. Keys
/// `neuroada_values` `[out·k]` and `neuroada_indices` `[2, out·k]` (row, column; int32; Graft's, PEFT has no NeuroAda).
public final class NeuroAdaLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The bypass entries.
    public let delta: SparseDelta

    /// Picks the top-`k` |W| columns of every row; throws when `k` is not in 1...in.
    public init(base: Linear, k: Int, state: AdapterState, path: String) throws {
        guard k >= 1, k <= base.inFeatures else {
            throw GraftError.invalid("\(path): NeuroAda 'k' = \(k) must be in 1...\(base.inFeatures) (the layer's inputs)")
        }
        self.state = state
        let w = base.weight  // read once: a compact weight decodes on every read
        let inF = base.inFeatures
        var magnitudes = [Float](repeating: 0, count: inF)
        var positions: [Int] = []
        positions.reserveCapacity(base.outFeatures * k)
        for row in 0..<base.outFeatures {
            let pw = w.pointer + row * inF
            for j in 0..<inF { magnitudes[j] = abs(pw[j]) }
            let top = magnitudes.withUnsafeBufferPointer { topIndices($0, count: k) }
            positions += top.map { row * inF + $0 }
        }
        delta = SparseDelta(rows: base.outFeatures, cols: inF, positions: positions)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("neuroada_values", delta.values)] }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] { [delta.indexBuffer("neuroada_indices")] }

    public func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws {
        guard name == "neuroada_indices" else { throw GraftError.format("unknown NeuroAda integer tensor '\(name)'") }
        try delta.loadIndices(name, values: values, shape: shape)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor { y + delta.apply(x) }

    public func deltaWeight(base: Linear) -> Tensor? { delta.dense() }
}

/// NeuroAda (`peft_type: "NEUROADA"`, no PEFT counterpart): `k` (bypass connections per output neuron, default 1).
public enum NeuroAdaFactory: AdapterMethodFactory {
    public static let peftType = "NEUROADA"
    public static let family = "selective (sparse bypass)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["k": 8, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let k = try config.int("k", default: 1)
        guard k >= 1 else { throw GraftError.invalid("\(config.source): 'k' must be ≥ 1, got \(k)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try NeuroAdaLayer(base: layer, k: try config.int("k", default: 1), state: state, path: "\(config.source): \(path)")
    }
}
