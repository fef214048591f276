import GraftTensor

/// Something attached to an ``Embedding`` that changes its rows (PEFT's trainable tokens).
public protocol EmbeddingAdapter: AnyObject {
    /// Whether the adapter currently takes part in forward passes.
    var isEnabled: Bool { get }
    /// The adapted rows for `ids` given the base rows `y` (`[ids.count, dim]`).
    func forward(ids: [Int32], baseOutput y: Tensor, layer: Embedding) -> Tensor
}

/// A lookup table `[count, dim]`.
public final class Embedding: Module {
    /// Where the table lives: a float32 tensor, or a frozen compact matrix (a quantized GGUF table).
    private enum TableStorage {
        case dense(Tensor)
        case compact(any FrozenMatrix)
    }
    private var storage: TableStorage

    /// `[count, dim]`. For a compact table (``compactWeight``) every read decodes a fresh float32 copy: read it
    /// once where it is needed, and call ``makeWeightDense()`` before writing into it.
    public var weight: Tensor {
        switch storage {
        case .dense(let tensor): return tensor
        case .compact(let matrix): return matrix.dequantized()
        }
    }

    /// Creates a table over an existing tensor.
    public init(weight: Tensor) {
        storage = .dense(weight)
        super.init(typeName: "Embedding")
        register(parameter: "weight", weight)
    }

    /// Creates a frozen table kept in a compact format; lookups decode only the rows they need.
    public init(compact table: any FrozenMatrix) {
        storage = .compact(table)
        super.init(typeName: "Embedding")
    }

    /// The compact frozen table, or nil when the table is a float32 tensor.
    public var compactWeight: (any FrozenMatrix)? {
        if case .compact(let matrix) = storage { return matrix }
        return nil
    }

    /// The output projection that shares this table (a tied LM head), so both stay one tensor when the table
    /// turns dense.
    public weak var tiedHead: Linear?

    /// Decodes a compact table into a float32 tensor the layer keeps from now on (for writing rows into it); a
    /// tied head that shares the compact table shares the dense one too.
    public func makeWeightDense() {
        guard case .compact(let matrix) = storage else { return }
        let dense = matrix.dequantized()
        storage = .dense(dense)
        register(parameter: "weight", dense)
        if let head = tiedHead, head.compactWeight === matrix { head.setWeight(dense) }
    }

    /// A compact table as a parameter decoded on demand.
    public override var compactParameters: [(name: String, shape: [Int], source: AnyObject, decode: () -> Tensor)] {
        guard case .compact(let matrix) = storage else { return [] }
        return [("weight", [matrix.rows, matrix.cols], matrix, { matrix.dequantized() })]
    }

    /// Number of rows.
    public var count: Int {
        switch storage {
        case .dense(let tensor): return tensor.shape[0]
        case .compact(let matrix): return matrix.rows
        }
    }
    /// Row width.
    public var dim: Int {
        switch storage {
        case .dense(let tensor): return tensor.shape[1]
        case .compact(let matrix): return matrix.cols
        }
    }

    /// Adapters attached to this table, applied in order.
    public var adapters: [any EmbeddingAdapter] = []

    /// Rows for `ids` (already validated against ``count``), shape `[ids.count, dim]`.
    public func forward(_ ids: [Int32]) -> Tensor {
        var y = baseRows(ids)
        for adapter in adapters where adapter.isEnabled { y = adapter.forward(ids: ids, baseOutput: y, layer: self) }
        return y
    }

    /// The table's own rows for `ids` (already validated against ``count``), without adapters, `[ids.count, dim]`;
    /// a compact table decodes only these rows.
    public func baseRows(_ ids: [Int32]) -> Tensor {
        switch storage {
        case .dense(let tensor): return embedding(ids, table: tensor)
        case .compact(let matrix):
            let width = matrix.cols
            let y = Tensor(zeros: [ids.count, width])
            let out = y.pointer
            parallelFor(ids.count, grain: 64) { range in
                for i in range { matrix.decodeRows(Int(ids[i])..<(Int(ids[i]) + 1), into: out + i * width) }
            }
            return y
        }
    }

    public override var summary: String { "\(count), \(dim)" }
}
