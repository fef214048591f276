import GraftIO
import GraftModels
import GraftTensor

/// C3A (Chen et al., 2025): ΔW is block-circulant — block `(m, n)` of size `b` is the circulant matrix of a
/// learned kernel `k[m, n, :]` — applied as PEFT does with FFTs, which works out to
/// `y_m[s] += Σₙ Σᵤ k[m, n, u] · x_n[(s + u) mod b] / in`. Here ΔW is gathered from the kernels
/// (`ΔW[m·b + s, n·b + t] = k[m, n, (t − s) mod b] / in`) and applied as one GEMM. PEFT key `c3a_kernel`
/// `[out/b, in/b, b]`.
public final class C3ALayer: DenseDeltaMethod {
    public let state: AdapterState
    /// The kernels.
    public let kernel: Tensor
    let gather: [Int32]
    let inFeatures: Int, outFeatures: Int

    init(base: Linear, blockSize b: Int, state: AdapterState) throws {
        guard b > 0, base.inFeatures % b == 0, base.outFeatures % b == 0 else {
            throw GraftError.invalid("block_size \(b) must divide in_features \(base.inFeatures) and out_features \(base.outFeatures)")
        }
        self.state = state
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        let (mBlocks, nBlocks) = (base.outFeatures / b, base.inFeatures / b)
        // PEFT's default init (xavier_uniform on the kernel tensor) — bound √(6 / (fan_in + fan_out)).
        let fanIn = nBlocks * b, fanOut = mBlocks * b
        let bound = (6 / Float(fanIn + fanOut)).squareRoot()
        kernel = Tensor.randomUniform([mBlocks, nBlocks, b], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        var index = [Int32](repeating: 0, count: base.outFeatures * base.inFeatures)
        for row in 0..<base.outFeatures {
            let (m, s) = (row / b, row % b)
            for col in 0..<base.inFeatures {
                let (n, t) = (col / b, col % b)
                index[row * base.inFeatures + col] = Int32((m * nBlocks + n) * b + ((t - s) % b + b) % b)
            }
        }
        gather = index
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("c3a_kernel", kernel)] }

    /// ΔW, recorded.
    public func delta() -> Tensor {
        embedding(gather, table: kernel.reshaped([kernel.count, 1])).reshaped([outFeatures, inFeatures]) * (1 / Float(inFeatures))
    }
}

/// C3A (`peft_type: "C3A"`): `block_size` (dividing both widths).
public enum C3AFactory: AdapterMethodFactory {
    public static let peftType = "C3A"
    public static let family = "weight-delta (block-circulant)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["block_size": 64, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        switch config.value("init_weights") {
        case nil: break
        case let b? where JSONScalar.isBool(b): break
        case let s as String where ["xavier_uniform", "gaussian", "kaiming_uniform"].contains(s): break
        case let other?: throw GraftError(.unsupported, "\(config.source): C3A init_weights \(other) is not supported")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        do {
            return try C3ALayer(base: layer, blockSize: try config.int("block_size", default: 256), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
