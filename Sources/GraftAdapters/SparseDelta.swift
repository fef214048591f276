import GraftModels
import GraftTensor

/// A weight delta over chosen entries of an `[out, in]` matrix, stored as an index array and a value array —
/// never as a dense mask: entry `k` is ``values``[k] at (``rowIndex``[k], ``colIndex``[k]). Its forward
/// (``apply(_:)``) and backward touch only those entries (``sparseLinear(_:values:rowIndex:colIndex:outFeatures:)``),
/// and ``scatter(into:scale:)`` writes it into a weight entry by entry. The building block of the sparse methods
/// (SpIEL, NeuroAda, DSEE, SPT, ID³); saved as PEFT-style `[2, n]` int32 indices (row, column) beside `[n]` values.
public final class SparseDelta {
    /// The trainable entries `[n]`.
    public let values: Tensor
    /// Row of each entry.
    public private(set) var rowIndex: [Int32]
    /// Column of each entry.
    public private(set) var colIndex: [Int32]
    /// The matrix's shape.
    public let rows: Int, cols: Int

    /// A delta of zeros at `positions` (flat row-major indices into `[rows, cols]`, distinct and in range).
    public init(rows: Int, cols: Int, positions: [Int]) {
        self.rows = rows
        self.cols = cols
        values = Tensor(zeros: [positions.count]).requiringGrad()
        rowIndex = positions.map { Int32($0 / cols) }
        colIndex = positions.map { Int32($0 % cols) }
    }

    /// Number of entries (the trainable budget).
    public var count: Int { values.count }

    /// The flat row-major position of every entry.
    public var positions: [Int] { (0..<count).map { Int(rowIndex[$0]) * cols + Int(colIndex[$0]) } }

    /// `x · Δᵀ` (`[..., in]` → `[..., out]`), recorded for autograd.
    public func apply(_ x: Tensor) -> Tensor {
        sparseLinear(x, values: values, rowIndex: rowIndex, colIndex: colIndex, outFeatures: rows)
    }

    /// The delta as a dense `[rows, cols]` tensor, untracked (what a merge adds into W; exact: every other entry is 0).
    public func dense(scale: Float = 1) -> Tensor {
        let out = Tensor(zeros: [rows, cols])
        scatterAdd(into: out, values: values, rowIndex: rowIndex, colIndex: colIndex, scale: scale)
        return out
    }

    /// Adds `scale ·` the delta into `matrix` (`[rows, cols]`) in place, touching only the delta's entries.
    public func scatter(into matrix: Tensor, scale: Float = 1) {
        scatterAdd(into: matrix, values: values, rowIndex: rowIndex, colIndex: colIndex, scale: scale)
    }

    /// Moves the entries in `slots` to `newPositions` (flat, not already used) with value 0 (drop and regrow);
    /// the number of entries is unchanged.
    public func move(slots: [Int], to newPositions: [Int]) {
        for (s, p) in zip(slots, newPositions) {
            rowIndex[s] = Int32(p / cols)
            colIndex[s] = Int32(p % cols)
            values.pointer[s] = 0
        }
    }

    /// The indices as saved: `[2, n]` int32, rows then columns.
    public func indexBuffer(_ name: String) -> (name: String, values: [Int32], shape: [Int]) {
        (name, rowIndex + colIndex, [2, count])
    }

    /// Restores the indices from a loaded `[2, n]` tensor called `name` (checked by ``validatedIndices(_:_:shape:count:rows:cols:)``).
    public func loadIndices(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        (rowIndex, colIndex) = try Self.validatedIndices(name, loaded, shape: shape, count: count, rows: rows, cols: cols)
    }

    /// The (row, column) arrays of a loaded `[2, n]` index tensor called `name`, after checking its shape, the
    /// range of every index and that no position repeats (a repeat would count twice in a forward, once in a merge).
    public static func validatedIndices(_ name: String, _ loaded: [Int64], shape: [Int], count n: Int, rows: Int,
                                        cols: Int) throws -> ([Int32], [Int32]) {
        guard shape == [2, n], loaded.count == 2 * n else {
            throw GraftError.format("'\(name)' has shape \(shape), expected [2, \(n)]")
        }
        if let bad = loaded.prefix(n).first(where: { $0 < 0 || $0 >= Int64(rows) }) {
            throw GraftError.format("'\(name)' row \(bad) is outside 0..<\(rows)")
        }
        if let bad = loaded.suffix(n).first(where: { $0 < 0 || $0 >= Int64(cols) }) {
            throw GraftError.format("'\(name)' column \(bad) is outside 0..<\(cols)")
        }
        let r = loaded.prefix(n).map { Int32($0) }, c = loaded.suffix(n).map { Int32($0) }
        var seen = Set<Int>()
        for k in 0..<n where !seen.insert(Int(r[k]) * cols + Int(c[k])).inserted {
            throw GraftError.format("'\(name)' lists position (\(r[k]), \(c[k])) twice")
        }
        return (r, c)
    }
}

/// The `n` largest of `scores` (ties to the lower index; NaN ranks last), as indices in increasing order.
func topIndices(_ scores: UnsafeBufferPointer<Float>, count n: Int) -> [Int] {
    guard n < scores.count else { return Array(0..<scores.count) }
    func key(_ i: Int) -> Float { scores[i].isNaN ? -.infinity : scores[i] }
    let order = (0..<scores.count).sorted { key($0) != key($1) ? key($0) > key($1) : $0 < $1 }
    return Array(order.prefix(n)).sorted()
}

/// The entry count a `density` (fraction of `total`) gives, rounded up; throws naming `path` when it is not in 1...total.
func sparseBudget(density: Double, total: Int, path: String, method: String) throws -> Int {
    let n = Int((density * Double(total)).rounded(.up))
    guard n >= 1, n <= total else {
        throw GraftError.invalid("\(path): \(method) density \(density) gives \(n) entries for a layer of \(total)")
    }
    return n
}
