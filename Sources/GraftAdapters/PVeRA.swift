import Foundation
import GraftModels
import GraftTensor

/// PVeRA (probabilistic VeRA): VeRA whose shared down-projection `A: [2r, in_max]` produces a mean and a
/// log-variance, `[μ | log σ²] = λd ⊙ A x`, and the update is `λb ⊙ B z` with `z = μ` at inference and
/// `z = μ + ε ⊙ exp(½ log σ²)`, `ε ~ N(0, 1)`, while training (or always with `sample_at_inference`).
/// `B: [out_max, r]` is shared too; both are frozen Kaiming-uniform draws from `projection_prng_key`, regenerated
/// with PyTorch's generator (``TorchGenerator``) or read from the file (`save_projection`). PEFT keys
/// `pvera_lambda_b` `[out]`, `pvera_lambda_d` `[2r]`, `base_model.pvera_A`, `base_model.pvera_B`.
public final class PVeRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// Output scaling `[out]` (zero at PEFT's initialization).
    public let lambdaB: Tensor
    /// Scaling of the mean and log-variance rows `[2r]` (`d_initial`).
    public let lambdaD: Tensor
    let sharedA: Tensor, sharedB: Tensor
    let rank: Int, inFeatures: Int, outFeatures: Int
    let dropoutProbability: Float
    let sampleAtInference: Bool
    /// The noise generator when `generator_seed` is set (PEFT's `torch.Generator`), else the adapter's RNG.
    var noise: TorchGenerator?

    init(base: Linear, rank: Int, dInitial: Float, dropout: Float, sampleAtInference: Bool, generatorSeed: Int?,
         sharedA: Tensor, sharedB: Tensor, state: AdapterState) {
        self.state = state
        self.rank = rank
        self.sharedA = sharedA
        self.sharedB = sharedB
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        dropoutProbability = dropout
        self.sampleAtInference = sampleAtInference
        noise = generatorSeed.map { TorchGenerator(seed: UInt64(truncatingIfNeeded: $0)) }
        lambdaB = Tensor(zeros: [base.outFeatures]).requiringGrad()
        lambdaD = Tensor(repeating: dInitial, shape: [2 * rank]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("pvera_lambda_b", lambdaB), ("pvera_lambda_d", lambdaD)] }

    /// `A`'s first `rows` rows over this layer's inputs, and `B` over its outputs (frozen slices).
    private func slices(rows: Int) -> (a: Tensor, b: Tensor) {
        var a = sharedA.shape[0] == rows ? sharedA : sharedA.slice(dim: 0, 0..<rows)
        if a.shape[1] != inFeatures { a = a.slice(dim: 1, 0..<inFeatures) }
        let b = sharedB.shape[0] == outFeatures ? sharedB : sharedB.slice(dim: 0, 0..<outFeatures)
        return (a, b)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let xd = dropout(x, p: dropoutProbability, state: state)
        let z: Tensor
        if state.isTraining || sampleAtInference {
            let (a, _) = slices(rows: 2 * rank)
            let h = linear(xd, a) * lambdaD
            let last = h.rank - 1
            let mu = h.slice(dim: last, 0..<rank), logVariance = h.slice(dim: last, rank..<(2 * rank))
            let count = mu.count
            let eps: Tensor
            if var g = noise {
                eps = Tensor(shape: mu.shape, values: g.normal(count))
                noise = g
            } else {
                eps = Tensor(zeros: mu.shape)
                state.rng.fillNormal(eps.pointer, count: count)
            }
            z = mu + eps * exponential(logVariance * 0.5)
        } else {
            let (a, _) = slices(rows: rank)
            z = linear(xd, a) * lambdaD.slice(dim: 0, 0..<rank)
        }
        return y + linear(z, slices(rows: rank).b) * lambdaB
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let (a, b) = slices(rows: rank)
            let scaledA = a * lambdaD.slice(dim: 0, 0..<rank).reshaped([rank, 1])
            return matmul(b * lambdaB.reshaped([outFeatures, 1]), scaledA)
        }
    }
}

/// `exp(x)` elementwise, recorded for autograd (d/dx = exp x); sixteen lanes at a time (``vexp``).
func exponential(_ x: Tensor) -> Tensor {
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer, n = x.count
    var i = 0
    while i + 16 <= n {
        let e = vexp(UnsafeRawPointer(px + i).loadUnaligned(as: Float16x.self))
        UnsafeMutableRawPointer(po + i).storeBytes(of: e, as: Float16x.self)
        i += 16
    }
    while i < n { po[i] = Foundation.exp(px[i]); i += 1 }
    return Tensor.recordingCustomOp(out, inputs: [x]) { g in [g * out] }
}

/// PVeRA (`peft_type: "PVERA"`): `r`, `d_initial`, `pvera_dropout`, `projection_prng_key`, `save_projection`,
/// `sample_at_inference`, `generator_seed`.
public enum PVeRAFactory: AdapterMethodFactory {
    public static let peftType = "PVERA"
    public static let family = "weight-delta (shared random projections, probabilistic)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 64, "target_modules": targets] }
    public static var regeneratesSharedTensors: Bool { true }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 256)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let p = try config.double("pvera_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'pvera_dropout' must be in [0, 1), got \(p)") }
        // Saved or not, the projections are what projection_prng_key draws; a file that holds them is read.
        config.acknowledge("save_projection")
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): 'bias' = \(bias) is not supported (only \"none\")")
        }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
        if let seed = config.value("generator_seed"), !(seed is NSNull), try config.int("generator_seed", default: 0) < 0 {
            throw GraftError.invalid("\(config.source): 'generator_seed' must be non-negative")
        }
    }

    /// `pvera_A: [2r, in_max]` then `pvera_B: [out_max, r]`, Kaiming-uniform (a = 0) from one PyTorch generator.
    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let r = try config.int("r", default: 256)
        let maxIn = layers.map(\.inFeatures).max() ?? 0, maxOut = layers.map(\.outFeatures).max() ?? 0
        let seed = try config.int("projection_prng_key", default: 0)
        guard seed >= 0 else { throw GraftError.invalid("\(config.source): 'projection_prng_key' must be non-negative, got \(seed)") }
        var g = TorchGenerator(seed: UInt64(seed))
        let a = g.kaimingUniform(rows: 2 * r, cols: maxIn, a: 0)
        let b = g.kaimingUniform(rows: maxOut, cols: r, a: 0)
        return [("base_model.pvera_A", a), ("base_model.pvera_B", b)]
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let a = shared["base_model.pvera_A"], let b = shared["base_model.pvera_B"] else {
            throw GraftError(.internalError, "PVeRA projections were not created")
        }
        let seedValue = config.value("generator_seed")
        let seed = seedValue == nil || seedValue is NSNull ? nil : try config.int("generator_seed", default: 0)
        return PVeRALayer(base: layer, rank: try config.int("r", default: 256),
                          dInitial: Float(try config.double("d_initial", default: 0.1)),
                          dropout: Float(try config.double("pvera_dropout", default: 0)),
                          sampleAtInference: try config.bool("sample_at_inference", default: false), generatorSeed: seed,
                          sharedA: a, sharedB: b, state: state)
    }
}
