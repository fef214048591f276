import GraftModels
import GraftTensor

/// MoS, mixture of shards (Wang et al., 2024): LoRA whose `A` and `B` are assembled from small shards.
/// Every rank vector (a row of `A`, length `in`; a column of `B`, length `out`) is split into `in/len` or
/// `out/len` shard slots of length `len` (vector sharding). Each slot holds one shard, chosen by a fixed random
/// index (subset selection) from a global pool shared by every adapted layer, with separate pools and indices
/// for `A` and `B` (pair dissociation); a fraction of each layer's slots is served by shards private to that
/// layer (privatization). Then `ΔW = (α/r)·B A`, mergeable. Keys: shared `base_model.mos_shards_A` /
/// `base_model.mos_shards_B` `[shared_shards, len]` (trainable); per layer `mos_private_A` `[pA, len]`,
/// `mos_private_B` `[pB, len]` (absent when the private fraction leaves none) and the integer slot indices
/// `mos_index_A` `[r, in/len]`, `mos_index_B` `[r, out/len]` (values ≥ `shared_shards` address private shards).
public final class MoSLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// Shards private to this layer (nil when there are none).
    public let privateA: Tensor?, privateB: Tensor?
    let poolA: Tensor, poolB: Tensor
    /// Per slot, an index into `[pool; private]`.
    private(set) var indexA: [Int32], indexB: [Int32]
    let rank: Int, shardLength: Int, inFeatures: Int, outFeatures: Int
    /// `α / r`.
    public let scaling: Float

    init(base: Linear, rank: Int, alpha: Float, privateFraction: Double, poolA: Tensor, poolB: Tensor, state: AdapterState) throws {
        let len = poolA.shape[1]
        guard base.inFeatures % len == 0, base.outFeatures % len == 0 else {
            throw GraftError.invalid("shard_length \(len) must divide in_features \(base.inFeatures) and out_features \(base.outFeatures)")
        }
        self.state = state
        self.poolA = poolA
        self.poolB = poolB
        self.rank = rank
        shardLength = len
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        scaling = alpha / Float(rank)
        let slotsA = rank * base.inFeatures / len, slotsB = rank * base.outFeatures / len
        let nA = Int((privateFraction * Double(slotsA)).rounded()), nB = Int((privateFraction * Double(slotsB)).rounded())
        let bound = 1 / Float(base.inFeatures).squareRoot()
        privateA = nA > 0 ? Tensor.randomUniform([nA, len], low: -bound, high: bound, rng: &state.rng).requiringGrad() : nil
        privateB = nB > 0 ? Tensor(zeros: [nB, len]).requiringGrad() : nil
        indexA = MoSLayer.assign(slots: slotsA, privateCount: nA, poolSize: poolA.shape[0], rng: &state.rng)
        indexB = MoSLayer.assign(slots: slotsB, privateCount: nB, poolSize: poolB.shape[0], rng: &state.rng)
    }

    /// `privateCount` random slots get the private shards (each once), the others a random shared shard.
    static func assign(slots: Int, privateCount: Int, poolSize: Int, rng: inout GraftRNG) -> [Int32] {
        var order = Array(0..<slots)
        for i in stride(from: slots - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.nextUniform() * Float(i + 1)) % (i + 1)) }
        var index = [Int32](repeating: 0, count: slots)
        for (k, slot) in order.enumerated() {
            index[slot] = k < privateCount ? Int32(poolSize + k) : Int32(Int(rng.nextUniform() * Float(poolSize)) % poolSize)
        }
        return index
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        (privateA.map { [("mos_private_A", $0)] } ?? []) + (privateB.map { [("mos_private_B", $0)] } ?? [])
    }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        [("mos_index_A", indexA, [rank, inFeatures / shardLength]), ("mos_index_B", indexB, [rank, outFeatures / shardLength])]
    }

    public func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws {
        let (expected, limit): ([Int], Int)
        switch name {
        case "mos_index_A": (expected, limit) = ([rank, inFeatures / shardLength], poolA.shape[0] + (privateA?.shape[0] ?? 0))
        case "mos_index_B": (expected, limit) = ([rank, outFeatures / shardLength], poolB.shape[0] + (privateB?.shape[0] ?? 0))
        default: throw GraftError.format("unknown MoS integer tensor '\(name)'")
        }
        guard shape == expected, values.count == expected.reduce(1, *) else {
            throw GraftError.format("'\(name)' has shape \(shape), expected \(expected) (check r and shard_length)")
        }
        if let bad = values.first(where: { $0 < 0 || $0 >= Int64(limit) }) {
            throw GraftError.format("'\(name)' index \(bad) is outside 0..<\(limit) (shared_shards plus private shards)")
        }
        if name == "mos_index_A" { indexA = values.map { Int32($0) } } else { indexB = values.map { Int32($0) } }
    }

    /// A `[r, in]` and B `[out, r]`, recorded.
    func matrices() -> (Tensor, Tensor) {
        let tableA = privateA.map { concat([poolA, $0], dim: 0) } ?? poolA
        let tableB = privateB.map { concat([poolB, $0], dim: 0) } ?? poolB
        let a = embedding(indexA, table: tableA).reshaped([rank, inFeatures])
        let b = embedding(indexB, table: tableB).reshaped([rank, outFeatures]).transposed(0, 1)
        return (a, b)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let (a, b) = matrices()
        return y + linear(linear(x, a), b) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let (a, b) = matrices()
            return matmul(b, a) * scaling
        }
    }
}

/// MoS (`peft_type: "MOS"`): `r` (8), `lora_alpha` (16), `shard_length` (32, divides every adapted width),
/// `shared_shards` (256 per pool), `private_fraction` (0.25 of each layer's slots).
public enum MoSFactory: AdapterMethodFactory {
    public static let peftType = "MOS"
    public static let family = "weight-delta (shared shard pools)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 8, "lora_alpha": 16, "shard_length": 32, "shared_shards": 256, "private_fraction": 0.25, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        for key in ["r", "shard_length", "shared_shards"] where try config.int(key, default: 1) <= 0 {
            throw GraftError.invalid("\(config.source): '\(key)' must be positive")
        }
        let rho = try config.double("private_fraction", default: 0.25)
        guard rho >= 0, rho <= 1 else { throw GraftError.invalid("\(config.source): 'private_fraction' must be in [0, 1], got \(rho)") }
    }

    /// The two global pools: `A` uniform in ±1/√in (LoRA's A scale), `B` zero so ΔW starts at 0.
    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let n = try config.int("shared_shards", default: 256), len = try config.int("shard_length", default: 32)
        let bound = 1 / Float(max(layers.map(\.inFeatures).min() ?? 1, 1)).squareRoot()
        return [("base_model.mos_shards_A", Tensor.randomUniform([n, len], low: -bound, high: bound, rng: &state.rng).requiringGrad()),
                ("base_model.mos_shards_B", Tensor(zeros: [n, len]).requiringGrad())]
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let a = shared["base_model.mos_shards_A"], let b = shared["base_model.mos_shards_B"] else {
            throw GraftError(.internalError, "MoS shard pools missing")
        }
        do {
            return try MoSLayer(base: layer, rank: try config.int("r", default: 8), alpha: Float(try config.double("lora_alpha", default: 16)),
                                privateFraction: try config.double("private_fraction", default: 0.25), poolA: a, poolB: b, state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
