import GraftModels
import GraftTensor

/// SHiRA (Bhardwaj et al., 2024): a sparse high-rank update — `r·(in + out)` trainable entries of ΔW at fixed
/// positions, `y = W x + b + ΔW x`. PEFT keys `shira_weight` `[n]` and `shira_indices` `[2, n]` (row, column;
/// int32). Positions are drawn at random (`mask_type: "random"`) when the adapter is created and saved with it.
public final class SHiRALayer: DenseDeltaMethod {
    public let state: AdapterState
    /// The trainable entries.
    public let values: Tensor
    private(set) var rowIndex: [Int32]
    private(set) var colIndex: [Int32]
    let outFeatures: Int, inFeatures: Int

    /// Creates the layer with zero entries at `r·(in + out)` distinct random positions.
    public init(base: Linear, rank: Int, state: AdapterState) throws {
        let n = rank * (base.inFeatures + base.outFeatures)
        guard n <= base.inFeatures * base.outFeatures else {
            throw GraftError.invalid("SHiRA rank \(rank) gives \(n) entries, more than the layer's \(base.inFeatures * base.outFeatures)")
        }
        self.state = state
        outFeatures = base.outFeatures
        inFeatures = base.inFeatures
        values = Tensor(zeros: [n]).requiringGrad()
        // A partial Fisher-Yates shuffle picks n distinct flat positions.
        var positions = Array(0..<(base.inFeatures * base.outFeatures))
        for i in 0..<n {
            let j = i + Int(state.rng.next() % UInt64(positions.count - i))
            positions.swapAt(i, j)
        }
        let picked = positions.prefix(n).sorted()
        rowIndex = picked.map { Int32($0 / base.inFeatures) }
        colIndex = picked.map { Int32($0 % base.inFeatures) }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("shira_weight", values)] }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        [("shira_indices", rowIndex + colIndex, [2, rowIndex.count])]
    }

    public func loadIntegers(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        guard name == "shira_indices" else { throw GraftError.format("unknown SHiRA integer tensor '\(name)'") }
        (rowIndex, colIndex) = try SparseDelta.validatedIndices("shira_indices", loaded, shape: shape, count: values.count,
                                                                rows: outFeatures, cols: inFeatures)
    }

    /// `y + ΔW x` through the sparse product: only the `n` entries are touched, forward and backward.
    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        y + sparseLinear(x, values: values, rowIndex: rowIndex, colIndex: colIndex, outFeatures: outFeatures)
    }

    /// ΔW, recorded for autograd.
    public func delta() -> Tensor {
        denseFromSparse(values, rowIndex: rowIndex, colIndex: colIndex, rows: outFeatures, cols: inFeatures)
    }
}

/// SHiRA (`peft_type: "SHIRA"`): `r` (entries = r·(in + out)), `mask_type` (`"random"`).
public enum SHiRAFactory: AdapterMethodFactory {
    public static let peftType = "SHIRA"
    public static let family = "weight-delta (sparse)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 32, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        if let mask = try config.string("mask_type"), mask != "random" {
            throw GraftError(.unsupported, "\(config.source): SHiRA mask_type '\(mask)' is not supported (\"random\")")
        }
        let r = try config.int("r", default: 32)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        do {
            return try SHiRALayer(base: layer, rank: try config.int("r", default: 32), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
