import GraftModels
import GraftTensor

/// ETHER and ETHER+ (Bini et al., 2024): the frozen weight is multiplied block-wise by hyperplane reflections,
/// `W' = H_L W H_R`. Each side is block-diagonal with `nb` blocks; per block ETHER uses one reflection
/// `H = I − 2ûûᵀ` and ETHER+ the relaxed `H⁺ = I − ûûᵀ + v̂v̂ᵀ` (`û`, `v̂` unit vectors). Both are symmetric, so
/// the input side runs as `x ← x H_R` before the frozen layer and the output side as `y ← (y − b) H_L + b` after
/// it, O(N·d) per block vector; `W'` is only formed to merge. Keys (per adapted layer): `ether_u` `[nb, in/nb]`
/// and, for ETHER+, `ether_v` (input side); `ether_u_out` `[nb, out/nb]` and `ether_v_out` (output side).
public final class ETHERLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// Whether this is ETHER+ (two vectors per block) rather than ETHER (one reflection).
    public let plus: Bool
    /// Block count per side.
    public let blocks: Int
    /// Input-side vectors (empty when only the output side is adapted): `u` and, for ETHER+, `v`, each `[nb, in/nb]`.
    public let inputVectors: [Tensor]
    /// Output-side vectors, each `[nb, out/nb]` (empty when only the input side is adapted).
    public let outputVectors: [Tensor]

    /// Creates the layer: ETHER draws `u` at random (a reflection is never the identity); ETHER+ draws `u` and
    /// sets `v = u`, so training starts at the base model.
    public init(base: Linear, plus: Bool, blocks: Int, inputSide: Bool, outputSide: Bool, state: AdapterState) throws {
        guard blocks >= 1 else { throw GraftError.invalid("'nb' must be positive, got \(blocks)") }
        guard inputSide || outputSide else { throw GraftError.invalid("ETHER needs at least one side") }
        if inputSide, base.inFeatures % blocks != 0 {
            throw GraftError.invalid("nb \(blocks) does not divide in_features \(base.inFeatures)")
        }
        if outputSide, base.outFeatures % blocks != 0 {
            throw GraftError.invalid("nb \(blocks) does not divide out_features \(base.outFeatures) (side \"both\"/\"output\")")
        }
        self.state = state
        self.plus = plus
        self.blocks = blocks
        func vectors(_ width: Int) -> [Tensor] {
            // Entries of std 1/√bs give ‖u‖ ≈ 1, so optimizer steps of a given size turn û at a useful rate.
            let u = Tensor.randomNormal([blocks, width / blocks], std: 1 / Float(width / blocks).squareRoot(), rng: &state.rng)
            return plus ? [u.copy().requiringGrad(), u.copy().requiringGrad()] : [u.requiringGrad()]
        }
        inputVectors = inputSide ? vectors(base.inFeatures) : []
        outputVectors = outputSide ? vectors(base.outFeatures) : []
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        let names = ["u", "v"]
        return inputVectors.enumerated().map { ("ether_\(names[$0.offset])", $0.element) }
            + outputVectors.enumerated().map { ("ether_\(names[$0.offset])_out", $0.element) }
    }

    /// Rows of `v` scaled to unit length, recorded.
    private static func unit(_ v: Tensor) -> Tensor {
        let ones = Tensor(repeating: 1, shape: [v.shape[1], 1])
        return v * reciprocal(sqrt(matmul(v * v, ones)))  // [nb, bs] * [nb, 1]
    }

    /// Rows of `x` (`[..., nb·bs]`) times the block-diagonal `H` built from `vectors`:
    /// `x_b − 2(x_b·û)ûᵀ` (ETHER) or `x_b − (x_b·û)ûᵀ + (x_b·v̂)v̂ᵀ` (ETHER+) per block `b`.
    private func reflect(_ x: Tensor, _ vectors: [Tensor]) -> Tensor {
        let bs = vectors[0].shape[1]
        let shape = x.shape
        let rows = x.count / (blocks * bs)
        let grouped = x.reshaped([rows, blocks, bs]).permuted([1, 0, 2])  // [nb, rows, bs]
        var out = grouped
        for (k, v) in vectors.enumerated() {
            let coefficient: Float = plus ? (k == 0 ? -1 : 1) : -2
            let w = ETHERLayer.unit(v)
            let projection = matmul(grouped, w.reshaped([blocks, bs, 1]))  // [nb, rows, 1]
            out = out + matmul(projection, w.reshaped([blocks, 1, bs])) * coefficient
        }
        return out.permuted([1, 0, 2]).reshaped(shape)
    }

    public func transformInput(_ x: Tensor, layer: Linear) -> Tensor {
        inputVectors.isEmpty ? x : reflect(x, inputVectors)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        guard !outputVectors.isEmpty else { return y }
        guard let b = layer.bias else { return reflect(y, outputVectors) }
        return reflect(y - b, outputVectors) + b
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            // W H_R reflects W's rows; H_L M = (Mᵀ H_L)ᵀ reflects its columns.
            var m = inputVectors.isEmpty ? base.weight : reflect(base.weight, inputVectors)
            if !outputVectors.isEmpty { m = reflect(m.transposed(0, 1), outputVectors).transposed(0, 1) }
            return m - base.weight
        }
    }
}

/// ETHER (`peft_type: "ETHER"`): `nb` blocks per side (default 4) and `side`, `"input"` (`W H`, default),
/// `"output"` (`H W`) or `"both"` (`H W H`).
public enum ETHERFactory: AdapterMethodFactory {
    public static let peftType = "ETHER"
    public static let family = "multiplicative (block reflections)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["nb": 4, "side": "input", "target_modules": targets] }

    /// The sides `config` selects, validated.
    static func sides(_ config: AdapterConfig) throws -> (input: Bool, output: Bool) {
        switch try config.string("side") ?? "input" {
        case "input": return (true, false)
        case "output": return (false, true)
        case "both": return (true, true)
        case let other: throw GraftError.invalid("\(config.source): 'side' must be \"input\", \"output\" or \"both\", got \"\(other)\"")
        }
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try sides(config)
        let nb = try config.int("nb", default: 4)
        guard nb > 0 else { throw GraftError.invalid("\(config.source): 'nb' must be positive, got \(nb)") }
    }

    static func makeLayer(plus: Bool, for layer: Linear, path: String, config: AdapterConfig, state: AdapterState) throws -> any LinearAdapterMethod {
        let (input, output) = try sides(config)
        do {
            return try ETHERLayer(base: layer, plus: plus, blocks: try config.int("nb", default: 4), inputSide: input, outputSide: output, state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try makeLayer(plus: false, for: layer, path: path, config: config, state: state)
    }
}

/// ETHER+ (`peft_type: "ETHER_PLUS"`): as ``ETHERFactory`` with `H⁺ = I − ûûᵀ + v̂v̂ᵀ` per block.
public enum ETHERPlusFactory: AdapterMethodFactory {
    public static let peftType = "ETHER_PLUS"
    public static let family = "multiplicative (relaxed block reflections)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["nb": 4, "side": "both", "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws { try ETHERFactory.validate(config) }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try ETHERFactory.makeLayer(plus: true, for: layer, path: path, config: config, state: state)
    }
}
