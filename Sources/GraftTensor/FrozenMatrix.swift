/// A frozen `[rows, cols]` weight kept in a compact format (a GGUF block format) and decoded to float32 a tile of
/// rows at a time inside the products that use it, so no float32 copy of the whole matrix is ever held.
public protocol FrozenMatrix: AnyObject, Sendable {
    /// Rows (a Linear layer's output width).
    var rows: Int { get }
    /// Columns (its input width).
    var cols: Int { get }
    /// Bytes the matrix holds in memory.
    var residentBytes: Int { get }
    /// The name of the storage format (`Q4_1`, `Q8_0`, `F16`, …).
    var formatName: String { get }
    /// Writes rows `range` as float32, row-major (`range.count × cols` floats at `destination`), on the calling
    /// thread. `range` lies within `0..<rows`.
    func decodeRows(_ range: Range<Int>, into destination: UnsafeMutablePointer<Float>)
    /// Whether ``accumulateProduct(_:rows:outputRows:into:ldy:)`` multiplies straight from the compact format.
    var hasDirectProduct: Bool { get }
    /// Adds `x · Wᵀ` for the output rows `outputRows` (`y[i·ldy + r] += Σ_k W[r, k] · x[i·cols + k]`, `m` rows of
    /// `x`) straight from the compact format, on the calling thread. Only called when ``hasDirectProduct``.
    func accumulateProduct(_ x: UnsafePointer<Float>, rows m: Int, outputRows: Range<Int>, into y: UnsafeMutablePointer<Float>,
                           ldy: Int)
    /// Whether ``accumulateInt8Product(_:outputRows:into:ldy:)`` multiplies int8 activations with the blocks.
    var hasInt8Product: Bool { get }
    /// The fast mode's ``accumulateProduct(_:rows:outputRows:into:ldy:)``: adds `x · Wᵀ` for `outputRows` with
    /// `x` quantized to int8 per block, on the calling thread. Only called when ``hasInt8Product``.
    func accumulateInt8Product(_ x: Int8Rows, outputRows: Range<Int>, into y: UnsafeMutablePointer<Float>, ldy: Int)
}

extension FrozenMatrix {
    /// No direct product unless the format provides one.
    public var hasDirectProduct: Bool { false }
    /// Unused without ``hasDirectProduct``.
    public func accumulateProduct(_ x: UnsafePointer<Float>, rows m: Int, outputRows: Range<Int>,
                                  into y: UnsafeMutablePointer<Float>, ldy: Int) {}
    /// No int8 product unless the format provides one.
    public var hasInt8Product: Bool { false }
    /// Unused without ``hasInt8Product``.
    public func accumulateInt8Product(_ x: Int8Rows, outputRows: Range<Int>, into y: UnsafeMutablePointer<Float>, ldy: Int) {}

    /// The whole matrix decoded to a new float32 tensor `[rows, cols]`.
    public func dequantized() -> Tensor {
        let out = Tensor(uninitialized: [rows, cols])
        let width = cols, base = out.pointer
        parallelFor(rows, grain: max(1, 65_536 / max(width, 1))) { range in
            decodeRows(range, into: base + range.lowerBound * width)
        }
        return out
    }

    /// Rows decoded per tile: about a megabyte of float32, a multiple of 16 rows.
    var tileRows: Int {
        let target = max(16, (1 << 18) / max(cols, 1)) / 16 * 16
        return max(1, min(rows, target))
    }
}

/// Up to this many input rows, ``linear(_:frozen:_:)`` multiplies straight from the blocks when the format can; more
/// rows amortise decoding a tile to float32 over a GEMM.
public let directProductRows = 16

/// `x · Wᵀ (+ bias)` for a frozen compact `weight` (`[out, in]`): the Linear layer on a quantized base.
///
/// Forward decodes `weight` a tile of output rows at a time, the tiles shared out over Graft's threads, each
/// tile's product a single-threaded GEMM into its columns of the output. Backward gives the input gradient
/// `dy · W` (tile by tile, accumulated) and the bias gradient; the weight itself gets none. The float32 values
/// multiplied are exactly those ``FrozenMatrix/dequantized()`` returns, so results match the float32 layer on
/// the dequantized weight up to summation order.
///
/// `update`, when given, adds to output rows after their product, on the thread that computed them, once every
/// part of it has been prepared (a decoding step's adapter updates, see ``DecodingUpdate``); it is not
/// differentiated.
public func linear(_ x: Tensor, frozen weight: any FrozenMatrix, _ bias: Tensor? = nil,
                   update: DecodingUpdate? = nil) -> Tensor {
    let inF = weight.cols, outF = weight.rows
    precondition(x.lastDim == inF, "linear: input \(x.shape) does not end in \(inF)")
    let rowsN = x.rows, tile = weight.tileRows
    let tiles = outF == 0 ? 0 : (outF + tile - 1) / tile
    let out: Tensor
    if let direct = blockProducts(x, [FrozenProduct(weight: weight, bias: bias, update: update)]) {
        // The fast mode (every row count, so a sequence's rows get the same products whether its prompt ran whole,
        // after a cached prefix, or batched with others), or a decoding step: straight from the blocks.
        out = direct[0]
    } else {
        out = linearOutput(x, inFeatures: inF, outFeatures: outF, bias: bias)
        if inF > 0 && rowsN > 0 {
            let xp = UnsafePointer(x.pointer), op = out.pointer, beta: Float = bias == nil ? 0 : 1
            parallelFor(tiles, grain: 1) { range in
                let scratch = TensorBuffer(count: tile * inF, zeroed: false)
                for t in range {
                    let rows = (t * tile)..<min(outF, (t + 1) * tile)
                    weight.decodeRows(rows, into: scratch.pointer)
                    sgemmSerial(transA: false, transB: true, m: rowsN, n: rows.count, k: inF, alpha: 1, a: xp,
                                lda: inF, b: scratch.pointer, ldb: inF, beta: beta, c: op + rows.lowerBound, ldc: outF)
                }
            }
            if let update {
                for part in 0..<update.parts { update.prepare(part) }
                update.apply(0..<outF, op, outF)
            }
        }
    }
    var inputs = [x]
    if let bias { inputs.append(bias) }
    // The input gradient needs the input's shape only, not its values.
    let xShape: [Int]? = x.requiresGrad ? x.shape : nil, biasShape: [Int]? = (bias?.requiresGrad ?? false) ? bias?.shape : nil
    return Tensor.result(out, inputs: inputs) { g in
        var dx: Tensor? = nil
        if let xShape {
            let t = Tensor(zeros: xShape)
            if inF > 0 && outF > 0 && rowsN > 0 {
                let scratch = TensorBuffer(count: tile * inF, zeroed: false)
                for index in 0..<tiles {
                    let rows = (index * tile)..<min(outF, (index + 1) * tile)
                    let base = scratch.pointer
                    parallelFor(rows.count, grain: max(1, 16_384 / max(inF, 1))) { part in
                        weight.decodeRows((rows.lowerBound + part.lowerBound)..<(rows.lowerBound + part.upperBound),
                                          into: base + part.lowerBound * inF)
                    }
                    sgemm(transA: false, transB: false, m: rowsN, n: inF, k: rows.count,
                          a: g.pointer + rows.lowerBound, lda: outF, b: base, ldb: inF,
                          beta: index == 0 ? 0 : 1, c: t.pointer, ldc: inF)
                }
            }
            dx = t
        }
        return [dx, biasShape.map { g.sumToShape($0) }]
    }
}
