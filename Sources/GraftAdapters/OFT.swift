import GraftModels
import GraftTensor

/// OFT (Qiu et al., 2023; PEFT's current form): the input is rotated block-wise before the frozen layer,
/// `y = W (R x) + b` with `R = diag(R₁ … R_r)`, each `Rᵢ` the Cayley transform of a skew-symmetric `Qᵢ` built
/// from `block·(block−1)/2` parameters, approximated by the Neumann series `I + 2Q + 2Q² + … + Qⁿ⁻¹` as PEFT's
/// `use_cayley_neumann` does. PEFT key `oft_R.weight` `[r, block·(block−1)/2]`.
public final class OFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The skew-symmetric parameters, one row per block.
    public let weight: Tensor
    let blockSize: Int, blocks: Int, neumannTerms: Int
    /// For each entry of a `[blocks, b, b]` tensor, its index into `[weight, −weight, 0]` flattened.
    let skewIndex: [Int32]

    /// Creates the layer (zeros: the identity rotation).
    public init(base: Linear, blockSize: Int, neumannTerms: Int, state: AdapterState) throws {
        guard blockSize > 1, base.inFeatures % blockSize == 0 else {
            throw GraftError.invalid("oft_block_size \(blockSize) must be > 1 and divide in_features \(base.inFeatures)")
        }
        self.state = state
        self.blockSize = blockSize
        blocks = base.inFeatures / blockSize
        self.neumannTerms = neumannTerms
        let n = blockSize * (blockSize - 1) / 2
        weight = Tensor(zeros: [blocks, n]).requiringGrad()
        // Upper-triangle positions in row-major order, as torch.triu_indices(b, b, 1).
        var position = [[Int]](repeating: [Int](repeating: -1, count: blockSize), count: blockSize)
        var k = 0
        for i in 0..<blockSize { for j in (i + 1)..<blockSize { position[i][j] = k; k += 1 } }
        let total = blocks * n
        var index: [Int32] = []
        index.reserveCapacity(blocks * blockSize * blockSize)
        for b in 0..<blocks { for i in 0..<blockSize { for j in 0..<blockSize {
            if i < j { index.append(Int32(b * n + position[i][j])) }
            else if i > j { index.append(Int32(total + b * n + position[j][i])) }
            else { index.append(Int32(2 * total)) }
        } } }
        skewIndex = index
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("oft_R.weight", weight)] }

    /// The rotations `[blocks, b, b]`, recorded.
    private func rotations() -> Tensor {
        let flat = weight.reshaped([weight.count, 1])
        let table = concat([flat, flat * -1, Tensor(zeros: [1, 1])], dim: 0)
        let q = embedding(skewIndex, table: table).reshaped([blocks, blockSize, blockSize])
        var identity = [Float](repeating: 0, count: blocks * blockSize * blockSize)
        for b in 0..<blocks { for i in 0..<blockSize { identity[(b * blockSize + i) * blockSize + i] = 1 } }
        var r = Tensor(shape: [blocks, blockSize, blockSize], values: identity)
        guard neumannTerms > 1 else { return r }
        r = r + q * 2
        guard neumannTerms > 2 else { return r }
        var power = matmul(q, q)
        r = r + power * 2
        if neumannTerms > 4 {
            for _ in 3..<(neumannTerms - 1) {
                power = matmul(power, q)
                r = r + power * 2
            }
        }
        power = matmul(power, q)
        return r + power
    }

    /// `x` rotated block-wise: `x_b ← x_b Rᵦ` (or `x_b Rᵦᵀ` when `transpose`).
    private func rotate(_ x: Tensor, transpose: Bool) -> Tensor {
        let shape = x.shape
        let rows = x.count / (blocks * blockSize)
        let grouped = x.reshaped([rows, blocks, blockSize]).permuted([1, 0, 2])  // [blocks, rows, b]
        let rotated = matmul(grouped, rotations(), transposeB: transpose)
        return rotated.permuted([1, 0, 2]).reshaped(shape)
    }

    public func transformInput(_ x: Tensor, layer: Linear) -> Tensor { rotate(x, transpose: false) }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor { y }

    public func deltaWeight(base: Linear) -> Tensor? {
        // y = W (x R)ᵀ-style: y = (x R) Wᵀ = x (W Rᵀ)ᵀ, so W' = W Rᵀ: rotate W's rows by Rᵀ.
        withNoGrad { rotate(base.weight, transpose: true) - base.weight }
    }
}

/// OFT (`peft_type: "OFT"`): `oft_block_size` (or `r` blocks), `use_cayley_neumann` with
/// `num_cayley_neumann_terms`; `coft`, `block_share` and the exact Cayley solve are not supported yet.
public enum OFTFactory: AdapterMethodFactory {
    public static let peftType = "OFT"
    public static let family = "orthogonal (block Cayley rotations)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["oft_block_size": 32, "r": 0, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        for flag in ["coft", "block_share"] where try config.bool(flag, default: false) {
            throw GraftError(.unsupported, "\(config.source): OFT '\(flag)' is not supported yet")
        }
        // `eps` bounds COFT's constraint only, and COFT is rejected above.
        config.acknowledge("eps")
        guard try config.bool("use_cayley_neumann", default: true) else {
            throw GraftError(.unsupported, "\(config.source): OFT with use_cayley_neumann false (an exact solve) is not supported yet")
        }
        if try config.double("module_dropout", default: 0) != 0 {
            throw GraftError(.unsupported, "\(config.source): OFT 'module_dropout' is not supported yet (use 0)")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        var block = try config.int("oft_block_size", default: 32)
        let r = try config.int("r", default: 0)
        if block == 0 && r > 0 && layer.inFeatures % r == 0 { block = layer.inFeatures / r }
        do {
            return try OFTLayer(base: layer, blockSize: block, neumannTerms: try config.int("num_cayley_neumann_terms", default: 5), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
