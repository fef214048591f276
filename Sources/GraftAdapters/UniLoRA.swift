import Foundation
import GraftModels
import GraftTensor

/// Uni-LoRA: every entry of every layer's LoRA factors is one shared trainable vector `θ: [d]` gathered through
/// a fixed index and scaled by `1/√(uses of that index)`: `A[i] = θ[idx_A[i]] · s_A[i]`, `B[j] = θ[idx_B[j]] · s_B[j]`,
/// `y = W x + B A x`. The indices assign each of `d` entries `⌊D/d⌋` or `⌈D/d⌉` times over all `D` factor entries
/// (layers in module order, A then B), shuffled by NumPy's `default_rng(proj_seed)` (``NumpyPCG64``); PEFT saves
/// only `base_model.unilora_theta_d` unless `save_indices`.
public final class UniLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The shared vector θ `[d]`.
    public let theta: Tensor
    var indicesA: [Int32], indicesB: [Int32]
    let scalesA: Tensor, scalesB: Tensor
    let rank: Int, inFeatures: Int, outFeatures: Int
    let saveIndices: Bool
    let dropoutProbability: Float

    init(base: Linear, rank: Int, theta: Tensor, indicesA: [Int32], indicesB: [Int32], counts: [Int32],
         saveIndices: Bool, dropout: Float, state: AdapterState) {
        self.state = state
        self.theta = theta
        self.indicesA = indicesA
        self.indicesB = indicesB
        self.rank = rank
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        self.saveIndices = saveIndices
        dropoutProbability = dropout
        func scales(_ idx: [Int32], _ shape: [Int]) -> Tensor {
            Tensor(shape: shape, values: idx.map { counts[Int($0)] > 0 ? 1 / Float(counts[Int($0)]).squareRoot() : 0 })
        }
        scalesA = scales(indicesA, [rank, inFeatures])
        scalesB = scales(indicesB, [outFeatures, rank])
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [] }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        saveIndices ? [("unilora_indices_A", indicesA, [rank, inFeatures]), ("unilora_indices_B", indicesB, [outFeatures, rank])] : []
    }

    public var savedBuffers: [(name: String, tensor: Tensor)] {
        saveIndices ? [("unilora_scales_A", scalesA), ("unilora_scales_B", scalesB)] : []
    }

    public func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws {
        let expected = name == "unilora_indices_A" ? [rank, inFeatures] : [outFeatures, rank]
        guard name == "unilora_indices_A" || name == "unilora_indices_B" else {
            throw GraftError.format("unexpected integer tensor '\(name)' for UniLoRA")
        }
        guard shape == expected else { throw GraftError.format("'\(name)' has shape \(shape), the layer expects \(expected)") }
        guard let bad = values.first(where: { $0 < 0 || $0 >= Int64(theta.count) }) else {
            let idx = values.map { Int32($0) }
            if name == "unilora_indices_A" { indicesA = idx } else { indicesB = idx }
            return
        }
        throw GraftError.format("'\(name)' holds index \(bad), outside theta_d's \(theta.count) entries")
    }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {
        switch name {
        case "unilora_scales_A": try copyParameter(name, into: scalesA, from: tensor)
        case "unilora_scales_B": try copyParameter(name, into: scalesB, from: tensor)
        default: break
        }
    }

    /// `θ[idx] ⊙ scales`, recorded for autograd through θ (a scatter-add backward).
    func gathered(_ idx: [Int32], _ scales: Tensor) -> Tensor {
        let out = Tensor(zeros: scales.shape)
        let pt = theta.pointer, ps = scales.pointer, po = out.pointer
        for i in 0..<idx.count { po[i] = pt[Int(idx[i])] * ps[i] }
        let theta = theta
        return Tensor.recordingCustomOp(out, inputs: [theta]) { g in
            let d = Tensor(zeros: theta.shape)
            let pg = g.pointer, pd = d.pointer, ps = scales.pointer
            for i in 0..<idx.count { pd[Int(idx[i])] += pg[i] * ps[i] }
            return [d]
        }
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let a = gathered(indicesA, scalesA), b = gathered(indicesB, scalesB)
        return y + linear(linear(dropout(x, p: dropoutProbability, state: state), a), b)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(gathered(indicesB, scalesB), gathered(indicesA, scalesA)) }
    }
}

/// NumPy's `default_rng(seed)`: SeedSequence → PCG64 (XSL-RR 128/64), with the draws UniLoRA makes: `choice`
/// without replacement (Floyd's algorithm, or a tail shuffle for populations over 10000) and `shuffle`.
struct NumpyPCG64 {
    private var state: (hi: UInt64, lo: UInt64) = (0, 0)
    private let inc: (hi: UInt64, lo: UInt64)
    private var spare: UInt32? = nil
    private static let multiplier: (hi: UInt64, lo: UInt64) = (0x2360_ED05_1FC6_5DA4, 0x4385_DF64_9FCC_F645)

    init(seed: UInt64) {
        let words = NumpyPCG64.seedSequence(seed, words64: 4)
        let initSeq = (words[2], words[3])
        inc = ((initSeq.0 << 1) | (initSeq.1 >> 63), (initSeq.1 << 1) | 1)
        step()
        let (lo, carry) = state.lo.addingReportingOverflow(words[1])
        state = (state.hi &+ words[0] &+ (carry ? 1 : 0), lo)
        step()
    }

    /// SeedSequence(seed).generate_state(words64, uint64): the entropy pool of 4 words mixed by NumPy's hashes.
    static func seedSequence(_ seed: UInt64, words64: Int) -> [UInt64] {
        var entropy: [UInt32] = []
        var s = seed
        repeat {
            entropy.append(UInt32(truncatingIfNeeded: s))
            s >>= 32
        } while s != 0
        var hashConst: UInt32 = 0x43B0_D7E5
        func hashmix(_ v: UInt32) -> UInt32 {
            var value = v ^ hashConst
            hashConst = hashConst &* 0x931E_8875
            value = value &* hashConst
            return value ^ (value >> 16)
        }
        func mix(_ x: UInt32, _ y: UInt32) -> UInt32 {
            let r = 0xCA01_F9DD &* x &- 0x4973_F715 &* y
            return r ^ (r >> 16)
        }
        var pool = (0..<4).map { hashmix($0 < entropy.count ? entropy[$0] : 0) }
        for src in 0..<4 {
            for dst in 0..<4 where src != dst { pool[dst] = mix(pool[dst], hashmix(pool[src])) }
        }
        for src in 4..<max(4, entropy.count) {
            for dst in 0..<4 { pool[dst] = mix(pool[dst], hashmix(entropy[src])) }
        }
        var h: UInt32 = 0x8B51_F9DD
        let words32: [UInt32] = (0..<(2 * words64)).map { i in
            var v = pool[i % 4] ^ h
            h = h &* 0x58F3_8DED
            v = v &* h
            return v ^ (v >> 16)
        }
        return (0..<words64).map { UInt64(words32[2 * $0]) | UInt64(words32[2 * $0 + 1]) << 32 }
    }

    private mutating func step() {
        let m = NumpyPCG64.multiplier
        let low = state.lo.multipliedFullWidth(by: m.lo)
        let hi = low.high &+ state.hi &* m.lo &+ state.lo &* m.hi
        let (lo, carry) = low.low.addingReportingOverflow(inc.lo)
        state = (hi &+ inc.hi &+ (carry ? 1 : 0), lo)
    }

    mutating func next64() -> UInt64 {
        step()
        let x = state.hi ^ state.lo, rot = state.hi >> 58
        return (x >> rot) | (x << ((64 - rot) & 63))
    }

    mutating func next32() -> UInt32 {
        if let s = spare {
            spare = nil
            return s
        }
        let n = next64()
        spare = UInt32(truncatingIfNeeded: n >> 32)
        return UInt32(truncatingIfNeeded: n)
    }

    /// Uniform in `0...max` by masked rejection (NumPy's `random_interval`, used by `shuffle`).
    mutating func interval(_ max: UInt64) -> UInt64 {
        guard max > 0 else { return 0 }
        var mask = max
        for shift in [1, 2, 4, 8, 16, 32] as [UInt64] { mask |= mask >> shift }
        while true {
            let v = max <= UInt64(UInt32.max) ? UInt64(next32()) & mask : next64() & mask
            if v <= max { return v }
        }
    }

    /// Uniform in `0...range` by Lemire's method (NumPy's `random_bounded_uint64` without a mask), for ranges
    /// below 2³² − 1.
    mutating func bounded(_ range: UInt64) -> UInt64 {
        guard range > 0 else { return 0 }
        let excl = range + 1
        var m = UInt64(next32()) * excl
        if m & 0xFFFF_FFFF < excl {
            let threshold = (UInt64(UInt32.max) - range) % excl
            while m & 0xFFFF_FFFF < threshold { m = UInt64(next32()) * excl }
        }
        return m >> 32
    }

    /// `choice(n, size, replace=False)`.
    mutating func choiceWithoutReplacement(_ n: Int, _ size: Int) -> [Int] {
        if n > 10000 && size > n / 50 {
            var idx = Array(0..<n)
            for i in stride(from: n - 1, through: Swift.max(n - size, 1), by: -1) { idx.swapAt(i, Int(bounded(UInt64(i)))) }
            return Array(idx[(n - size)...])
        }
        var out: [Int] = []
        var chosen = Set<Int>()
        for j in (n - size)..<n {
            var v = Int(bounded(UInt64(j)))
            if chosen.contains(v) { v = j }
            chosen.insert(v)
            out.append(v)
        }
        for i in stride(from: size - 1, through: 1, by: -1) { out.swapAt(i, Int(bounded(UInt64(i)))) }
        return out
    }

    /// `shuffle(data)` for a 1-D array.
    mutating func shuffle(_ data: inout [Int32]) {
        for i in stride(from: data.count - 1, through: 1, by: -1) { data.swapAt(i, Int(interval(UInt64(i)))) }
    }
}

/// Uni-LoRA (`peft_type: "UNILORA"`): `r`, `theta_d_length`, `proj_seed`, `init_theta_d_bound`, `init_weights`
/// (`true`: θ ~ U(−bound, bound); `false`: N(0, 1)), `unilora_dropout`, `save_indices`.
public enum UniLoRAFactory: AdapterMethodFactory {
    public static let peftType = "UNILORA"
    public static let family = "weight-delta (one shared vector, fixed index)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 8, "theta_d_length": 4096, "init_theta_d_bound": 0.1, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 4), d = try config.int("theta_d_length", default: 256)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        guard d > 0 else { throw GraftError.invalid("\(config.source): 'theta_d_length' must be positive, got \(d)") }
        guard try config.int("proj_seed", default: 0) >= 0 else { throw GraftError.invalid("\(config.source): 'proj_seed' must be non-negative") }
        try validateDropoutBiasAndLayout(config, dropoutKey: "unilora_dropout")
    }

    /// PEFT's `generate_index`: each of `d` values `count / d` times, plus `count mod d` distinct extras, shuffled.
    static func generateIndex(count: Int, length d: Int, seed: UInt64) -> [Int32] {
        var rng = NumpyPCG64(seed: seed)
        var data: [Int32] = []
        data.reserveCapacity(count)
        for v in 0..<d { data.append(contentsOf: repeatElement(Int32(v), count: count / d)) }
        if count % d > 0 { data.append(contentsOf: rng.choiceWithoutReplacement(d, count % d).map { Int32($0) }) }
        rng.shuffle(&data)
        return data
    }

    /// θ, and the index assignment for every layer (kept in the adapter state for ``make``).
    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let r = try config.int("r", default: 4), d = try config.int("theta_d_length", default: 256)
        let total = layers.reduce(0) { $0 + r * ($1.inFeatures + $1.outFeatures) }
        let indices = generateIndex(count: total, length: d, seed: UInt64(try config.int("proj_seed", default: 0)))
        var counts = [Int32](repeating: 0, count: d)
        for i in indices { counts[Int(i)] += 1 }
        state.integerTables["unilora.indices"] = indices
        state.integerTables["unilora.counts"] = counts
        var offset = 0
        for (i, l) in layers.enumerated() {
            state.targetIndex[ObjectIdentifier(l)] = i
            state.integerTables["unilora.offset.\(i)"] = [Int32(offset)]
            offset += r * (l.inFeatures + l.outFeatures)
        }
        let bound = Float(try config.double("init_theta_d_bound", default: 0.02))
        let theta = try config.bool("init_weights", default: true)
            ? Tensor.randomUniform([d], low: -bound, high: bound, rng: &state.rng) : Tensor.randomNormal([d], rng: &state.rng)
        return [("base_model.unilora_theta_d", theta.requiringGrad())]
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let theta = shared["base_model.unilora_theta_d"], let index = state.targetIndex[ObjectIdentifier(layer)],
              let offset = state.integerTables["unilora.offset.\(index)"]?.first.map(Int.init),
              let indices = state.integerTables["unilora.indices"], let counts = state.integerTables["unilora.counts"] else {
            throw GraftError(.internalError, "UniLoRA: the shared vector or index for '\(path)' was not created")
        }
        let r = try config.int("r", default: 4)
        let sizeA = r * layer.inFeatures, sizeB = layer.outFeatures * r
        return UniLoRALayer(base: layer, rank: r, theta: theta,
                            indicesA: Array(indices[offset..<(offset + sizeA)]),
                            indicesB: Array(indices[(offset + sizeA)..<(offset + sizeA + sizeB)]), counts: counts,
                            saveIndices: try config.bool("save_indices", default: false),
                            dropout: Float(try config.double("unilora_dropout", default: 0)), state: state)
    }
}
