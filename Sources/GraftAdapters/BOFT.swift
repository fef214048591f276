import GraftModels
import GraftTensor

/// BOFT (Liu et al., 2024, butterfly orthogonal fine-tuning): the input is rotated by a product of butterfly
/// factors before the frozen layer and the output is rescaled, `y = s ⊙ (W (x M)) + b`, with
/// `M = M_{m−1} ⋯ M₀`, `Mᵢ = Pᵢ diag(Qᵢ₁ … Qᵢ_D) Pᵢᵀ`. Each block is the exact Cayley transform
/// `Q = (I − S)(I + S)⁻¹` of `S = (R − Rᵀ)/2`, and `Pᵢ` is PEFT's block-butterfly permutation (`P₀ = I`).
/// PEFT keys: `boft_R` `[m, D, b, b]`, `boft_s` `[out, 1]`.
///
/// PEFT without its CUDA extension (every CPU install) trains with one butterfly factor whatever
/// `boft_n_butterfly_factor` says, so its files may hold `boft_R` `[1, D, b, b]` under a config asking for more;
/// loading adopts the factor count the file holds.
public final class BOFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `boft_R`: the (unconstrained) block parameters, `[factors, blocks, b, b]`.
    public private(set) var rotation: Tensor
    /// `boft_s`: the output scale, `[out, 1]`.
    public let scale: Tensor
    let blockSize: Int, blocks: Int, inFeatures: Int
    let dropoutProbability: Float
    /// Per factor, the butterfly permutation (`perm[r]` is the column row `r` reads).
    private(set) var permutations: [[Int]] = []

    init(base: Linear, blockSize: Int, blockCount: Int, factors: Int, dropout: Float, initWeights: Bool,
         state: AdapterState) throws {
        self.state = state
        self.blockSize = blockSize
        blocks = blockCount
        inFeatures = base.inFeatures
        dropoutProbability = dropout
        if initWeights {
            rotation = Tensor(zeros: [factors, blockCount, blockSize, blockSize]).requiringGrad()
            scale = Tensor(repeating: 1, shape: [base.outFeatures, 1]).requiringGrad()
        } else {
            rotation = Tensor.randomNormal([factors, blockCount, blockSize, blockSize], std: 0.1, rng: &state.rng).requiringGrad()
            let s = Tensor.randomNormal([base.outFeatures, 1], std: 0.1, rng: &state.rng)
            for i in 0..<s.count { s.pointer[i] += 1 }
            scale = s.requiringGrad()
        }
        permutations = try BOFTLayer.butterflyPermutations(inFeatures: inFeatures, blockSize: blockSize, blocks: blockCount, factors: factors)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("boft_R", rotation), ("boft_s", scale)] }

    public func load(_ name: String, from tensor: Tensor) throws {
        switch name {
        case "boft_s": try copyParameter(name, into: scale, from: tensor)
        case "boft_R":
            let s = rotation.shape
            if tensor.shape.count == 4, tensor.shape[0] >= 1, tensor.shape[0] != s[0], Array(tensor.shape[1...]) == Array(s[1...]) {
                // A file written with another number of butterfly factors (PEFT on CPU always uses one).
                permutations = try BOFTLayer.butterflyPermutations(inFeatures: inFeatures, blockSize: blockSize, blocks: blocks,
                                                                   factors: tensor.shape[0])
                rotation = Tensor(zeros: tensor.shape).requiringGrad()
            }
            try copyParameter(name, into: rotation, from: tensor)
        default: throw GraftError.format("unknown BOFT tensor '\(name)' (expected boft_R, boft_s)")
        }
    }

    /// PEFT's block-butterfly permutations, one per factor (identity for factor 0), after its checks.
    static func butterflyPermutations(inFeatures n: Int, blockSize: Int, blocks: Int, factors: Int) throws -> [[Int]] {
        let extra = factors - 1
        guard extra >= 0 else { throw GraftError.invalid("boft_n_butterfly_factor must be positive, got \(factors)") }
        if extra > 0 {
            guard blocks % (1 << extra) == 0, blocks % 2 == 0, blockSize % 2 == 0 else {
                throw GraftError.invalid("boft_n_butterfly_factor \(factors) needs an even block size and a block count (\(blocks)) divisible by \(1 << extra)")
            }
        }
        var result: [[Int]] = []
        for i in 0..<factors {
            guard extra > 0 else { result.append(Array(0..<n)); continue }
            let groupBlocks = blocks >> i
            let half = blockSize / 2
            let group = n / groupBlocks
            let step = group / half
            let order = Array(stride(from: 0, to: step, by: 2)) + Array(stride(from: 1, to: step, by: 2))
            var sorted: [Int] = []
            sorted.reserveCapacity(group)
            for pos in order { sorted.append(contentsOf: (pos * half)..<(pos * half + half)) }
            var perm = Array(0..<n)
            for start in stride(from: 0, to: n, by: group) {
                for t in 0..<group { perm[start + t] = start + sorted[t] }
            }
            result.append(perm)
        }
        return result
    }

    /// The orthogonal blocks `[factors·D, b, b]`, recorded (with PEFT's multiplicative block dropout in training).
    func blocksQ() -> Tensor {
        let count = rotation.shape[0] * blocks, b = blockSize
        let r = rotation.reshaped([count, b, b])
        let skew = (r - r.permuted([0, 2, 1])) * 0.5
        var eye = [Float](repeating: 0, count: count * b * b)
        for k in 0..<count { for i in 0..<b { eye[(k * b + i) * b + i] = 1 } }
        let identity = Tensor(shape: [count, b, b], values: eye)
        var q = matmul(identity - skew, inverse(identity + skew))
        if dropoutProbability > 0, state.isTraining {
            // One factor, picked at random, has ⌊p·D⌋ random blocks replaced by the identity.
            let factor = Int(state.rng.next() % UInt64(rotation.shape[0]))
            var chosen = Array(0..<blocks)
            chosen.shuffle(using: &state.rng)
            let mask = Tensor(zeros: [count, 1, 1])
            for d in chosen.prefix(Int(dropoutProbability * Float(blocks))) { mask.pointer[factor * blocks + d] = 1 }
            let keep = Tensor(repeating: 1, shape: [count, 1, 1]) - mask
            q = q * keep + identity * mask
        }
        return q
    }

    /// The full rotation `M` `[in, in]`, recorded.
    func denseRotation(_ q: Tensor) -> Tensor {
        let n = inFeatures, b = blockSize
        let total = q.count
        var index = [Int32](repeating: Int32(total), count: permutations.count * n * n)
        for (f, perm) in permutations.enumerated() {
            for r in 0..<n {
                let pr = perm[r], blockR = pr / b
                for c in 0..<n {
                    let pc = perm[c]
                    guard pc / b == blockR else { continue }
                    index[(f * n + r) * n + c] = Int32(((f * blocks + blockR) * b + pr % b) * b + pc % b)
                }
            }
        }
        let table = concat([q.reshaped([total, 1]), Tensor(zeros: [1, 1])], dim: 0)
        let factors = embedding(index, table: table).reshaped([permutations.count, n, n])
        var m = factors.slice(dim: 0, 0..<1).reshaped([n, n])
        for f in 1..<max(1, permutations.count) {
            m = matmul(factors.slice(dim: 0, f..<(f + 1)).reshaped([n, n]), m)
        }
        return m
    }

    public func transformInput(_ x: Tensor, layer: Linear) -> Tensor {
        let q = blocksQ()
        let shape = x.shape
        guard permutations.count == 1 else {
            return matmul(x.reshaped([-1, inFeatures]), denseRotation(q)).reshaped(shape)
        }
        // One factor, no permutation: rotate each block of the input, x_d ← x_d Q_d.
        let rows = x.count / inFeatures
        let grouped = x.reshaped([rows, blocks, blockSize]).permuted([1, 0, 2])
        return matmul(grouped, q).permuted([1, 0, 2]).reshaped(shape)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let s = scale.reshaped([scale.count])
        guard let bias = layer.bias else { return y * s }
        return (y - bias) * s + bias
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        // (x M) Wᵀ = x (W Mᵀ)ᵀ, so W' = s ⊙ (W Mᵀ) row-wise; the bias is not scaled.
        withNoGrad {
            let rotated = matmul(base.weight, denseRotation(blocksQ()), transposeB: true)
            return rotated * scale - base.weight
        }
    }
}

/// BOFT (`peft_type: "BOFT"`): `boft_block_size` or `boft_block_num` (exactly one non-zero),
/// `boft_n_butterfly_factor`, `boft_dropout`, `init_weights`.
public enum BOFTFactory: AdapterMethodFactory {
    public static let peftType = "BOFT"
    public static let family = "orthogonal (butterfly Cayley rotations)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): bias '\(bias)' is not supported (only \"none\")")
        }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
        let size = try config.int("boft_block_size", default: 4), num = try config.int("boft_block_num", default: 0)
        guard (size == 0) != (num == 0), size >= 0, num >= 0 else {
            throw GraftError.invalid("\(config.source): exactly one of 'boft_block_size' (\(size)) and 'boft_block_num' (\(num)) must be non-zero")
        }
        let factor = try config.int("boft_n_butterfly_factor", default: 1)
        guard factor >= 1 else { throw GraftError.invalid("\(config.source): 'boft_n_butterfly_factor' must be positive, got \(factor)") }
        let p = try config.double("boft_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'boft_dropout' must be in [0, 1), got \(p)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let n = layer.inFeatures
        let size = try config.int("boft_block_size", default: 4), num = try config.int("boft_block_num", default: 0)
        let factors = try config.int("boft_n_butterfly_factor", default: 1)
        let spread = 1 << min(factors - 1, 30)
        func fail(_ why: String) -> GraftError { GraftError.invalid("\(config.source): \(path): \(why)") }
        let blockSize: Int, blockCount: Int
        if size != 0 {
            guard n % size == 0 else { throw fail("in_features \(n) must be divisible by boft_block_size \(size)") }
            guard n % (size * spread) == 0 else {
                throw fail("in_features \(n), boft_n_butterfly_factor \(factors) and boft_block_size \(size) do not fit (need in_features divisible by \(size * spread))")
            }
            (blockSize, blockCount) = (size, n / size)
        } else {
            guard n % num == 0 else { throw fail("in_features \(n) must be divisible by boft_block_num \(num)") }
            guard num % spread == 0 else { throw fail("boft_block_num \(num) must be a multiple of 2^(boft_n_butterfly_factor − 1) = \(spread)") }
            (blockSize, blockCount) = (n / num, num)
        }
        do {
            return try BOFTLayer(base: layer, blockSize: blockSize, blockCount: blockCount, factors: factors,
                                 dropout: Float(try config.double("boft_dropout", default: 0)),
                                 initWeights: try config.bool("init_weights", default: true), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
