import GraftModels
import GraftTensor

/// RandLoRA (Albert et al., 2025): full-rank updates from frozen random low-rank bases shared by all layers,
/// with only diagonal scalings trained. With `n = ⌈min(in, out)/r⌉` bases, the scaled bases
/// `Â[k, b, :] = λ[k, b] · A[k, 0, :] ⊙ γ[b, :]` (`[r·n, min]`) and the flattened `B` (`[max, n·r]`) give
/// `y = W x + b + s · B̂ Â x` (or the transposed pair when `out < in`), `s = randlora_alpha / r`, in PEFT's exact
/// index orders. Keys: `randlora_lambda` `[r, n]`, `randlora_gamma` `[n, min]`; the shared frozen bases
/// `base_model.randlora_A` `[r, 1, min_max]` and `base_model.randlora_B` `[max_max, n_max, r]` (PEFT also stores
/// per-layer copies under `randlora_A` / `randlora_B`).
public final class RandLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    public let lambda: Tensor, gamma: Tensor
    let sharedA: Tensor, sharedB: Tensor
    let rank: Int, bases: Int, minDim: Int, maxDim: Int, inputIsSmaller: Bool
    /// `randlora_alpha / r`.
    public let scaling: Float

    init(base: Linear, rank: Int, alpha: Float, sharedA: Tensor, sharedB: Tensor, state: AdapterState) {
        self.state = state
        self.sharedA = sharedA
        self.sharedB = sharedB
        self.rank = rank
        minDim = min(base.inFeatures, base.outFeatures)
        maxDim = max(base.inFeatures, base.outFeatures)
        inputIsSmaller = minDim == base.inFeatures
        bases = (minDim + rank - 1) / rank
        scaling = alpha / Float(rank)
        lambda = Tensor(zeros: [rank, bases]).requiringGrad()
        gamma = Tensor(repeating: 1 / Float(maxDim), shape: [bases, minDim]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("randlora_lambda", lambda), ("randlora_gamma", gamma)] }
    public var savedBuffers: [(name: String, tensor: Tensor)] { [("randlora_A", sharedA), ("randlora_B", sharedB)] }

    /// `(Â [r·n, min], B̂ [max, n·r])`, recorded.
    private func scaledBases() -> (Tensor, Tensor) {
        let a = sharedA.slice(dim: 2, 0..<minDim)                       // [r, 1, min]
        let scaled = (lambda.reshaped([rank, bases, 1]) * a) * gamma.reshaped([1, bases, minDim])
        let b = sharedB.slice(dim: 0, 0..<maxDim).slice(dim: 1, 0..<bases)  // [max, n, r]
        return (scaled.reshaped([rank * bases, minDim]), b.reshaped([maxDim, bases * rank]))
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let (a, b) = scaledBases()
        let update = inputIsSmaller
            ? linear(linear(x, a), b)                                                // x Âᵀ B̂ᵀ
            : linear(linear(x, b.transposed(0, 1)), a.transposed(0, 1))              // x B̂ Â
        return y + update * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let (a, b) = scaledBases()
            return (inputIsSmaller ? matmul(b, a) : matmul(a, b, transposeA: true, transposeB: true)) * scaling
        }
    }
}

/// RandLoRA (`peft_type: "RANDLORA"`): `r`, `randlora_alpha`, `projection_prng_key`, `save_projection`.
public enum RandLoRAFactory: AdapterMethodFactory {
    public static let peftType = "RANDLORA"
    public static let family = "weight-delta (scaled random bases)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 32, "randlora_alpha": 640, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 32)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        // The bases are regenerated from projection_prng_key or read from the file when it holds them.
        config.acknowledge("save_projection")
        if try config.bool("sparse", default: false) || config.bool("very_sparse", default: false) {
            throw GraftError(.unsupported, "\(config.source): sparse RandLoRA bases are not supported yet")
        }
    }

    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let r = try config.int("r", default: 32)
        let minMax = layers.map { min($0.inFeatures, $0.outFeatures) }.max() ?? 0
        let maxMax = layers.map { max($0.inFeatures, $0.outFeatures) }.max() ?? 0
        let basesMax = (minMax + r - 1) / r
        var rng = GraftRNG(seed: UInt64(truncatingIfNeeded: try config.int("projection_prng_key", default: 0)))
        return [("base_model.randlora_A", Tensor.randomUniform([r, 1, minMax], low: -1 / Float(minMax).squareRoot(), high: 1 / Float(minMax).squareRoot(), rng: &rng)),
                ("base_model.randlora_B", Tensor.randomUniform([maxMax, basesMax, r], low: -1 / Float(r).squareRoot(), high: 1 / Float(r).squareRoot(), rng: &rng))]
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let a = shared["base_model.randlora_A"], let b = shared["base_model.randlora_B"] else {
            throw GraftError(.internalError, "RandLoRA bases were not created")
        }
        return RandLoRALayer(base: layer, rank: try config.int("r", default: 32),
                             alpha: Float(try config.double("randlora_alpha", default: 640)), sharedA: a, sharedB: b, state: state)
    }
}
