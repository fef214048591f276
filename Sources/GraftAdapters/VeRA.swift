import GraftModels
import GraftTensor

/// VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every adapted layer, and two
/// trainable scaling vectors per layer: `y = W x + Λb B Λd A x` with `A: [r, in_max]`, `B: [out_max, r]`
/// sliced to each layer's size. PEFT keys `vera_lambda_b` `[out]`, `vera_lambda_d` `[r]`, and the shared
/// `base_model.vera_A` / `base_model.vera_B` (saved with `save_projection`).
public final class VeRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// Output scaling `[out]` (PEFT initializes it to zero: ΔW = 0).
    public let lambdaB: Tensor
    /// Rank scaling `[r]` (initialized to `d_initial`).
    public let lambdaD: Tensor
    let sharedA: Tensor, sharedB: Tensor
    let inFeatures: Int, outFeatures: Int
    let dropoutProbability: Float

    init(base: Linear, rank: Int, dInitial: Float, dropout: Float, sharedA: Tensor, sharedB: Tensor, state: AdapterState) {
        self.state = state
        self.sharedA = sharedA
        self.sharedB = sharedB
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        dropoutProbability = dropout
        lambdaB = Tensor(zeros: [base.outFeatures]).requiringGrad()
        lambdaD = Tensor(repeating: dInitial, shape: [rank]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("vera_lambda_b", lambdaB), ("vera_lambda_d", lambdaD)] }

    /// The slices of the shared matrices this layer uses (frozen, so not recorded).
    private var slices: (a: Tensor, b: Tensor) {
        let a = sharedA.shape[1] == inFeatures ? sharedA : sharedA.slice(dim: 1, 0..<inFeatures)
        let b = sharedB.shape[0] == outFeatures ? sharedB : sharedB.slice(dim: 0, 0..<outFeatures)
        return (a, b)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let (a, b) = slices
        let h = linear(dropout(x, p: dropoutProbability, state: state), a) * lambdaD
        return y + linear(h, b) * lambdaB
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let (a, b) = slices
            // Λb B Λd A: scale B's columns by λd and its rows by λb, then multiply by A.
            let scaledB = (b * lambdaD) * lambdaB.reshaped([outFeatures, 1])
            return matmul(scaledB, a)
        }
    }
}

/// VeRA (`peft_type: "VERA"`): `r`, `d_initial`, `vera_dropout`, `projection_prng_key`, `save_projection`.
public enum VeRAFactory: AdapterMethodFactory {
    public static let peftType = "VERA"
    public static let family = "weight-delta (shared random projections)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 256, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 256)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        // The projections are regenerated from projection_prng_key or read from the file when it holds them.
        config.acknowledge("save_projection")
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): bias '\(bias)' is not supported (only \"none\")")
        }
    }

    /// The shared frozen projections, sized for the largest adapted layer.
    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let r = try config.int("r", default: 256)
        let maxIn = layers.map(\.inFeatures).max() ?? 0, maxOut = layers.map(\.outFeatures).max() ?? 0
        var rng = GraftRNG(seed: UInt64(truncatingIfNeeded: try config.int("projection_prng_key", default: 0)))
        return [("base_model.vera_A", kaimingUniform(r, maxIn, rng: &rng)),
                ("base_model.vera_B", kaimingUniform(maxOut, r, rng: &rng))]
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let a = shared["base_model.vera_A"], let b = shared["base_model.vera_B"] else {
            throw GraftError(.internalError, "VeRA projections were not created")
        }
        return VeRALayer(base: layer, rank: try config.int("r", default: 256),
                         dInitial: Float(try config.double("d_initial", default: 0.1)),
                         dropout: Float(try config.double("vera_dropout", default: 0)),
                         sharedA: a, sharedB: b, state: state)
    }
}
