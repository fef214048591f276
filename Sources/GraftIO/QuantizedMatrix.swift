import CGraftKernels
import Foundation
import GraftTensor

/// A `[rows, cols]` matrix held in a ggml block format (Q4_1, Q8_0, Q4_K, F16, …): a frozen Linear weight kept
/// as its GGUF bytes and decoded tile by tile inside the products (``linear(_:frozen:_:)``).
///
/// ggml stores a matrix row-major with every row a whole number of blocks, so any range of rows is one
/// contiguous byte range. The matrix either copies its bytes or, like llama.cpp, reads them straight from the
/// file's memory map, which it then keeps alive (only the pages touched count as resident, and they are shared
/// with the page cache). A row order (the Q/K rows llama.cpp's converter interleaves) is applied row by row as
/// the rows are decoded.
public final class QuantizedMatrix: FrozenMatrix, @unchecked Sendable {
    /// The storage format.
    public let type: GGMLType
    /// Rows.
    public let rows: Int
    /// Columns.
    public let cols: Int
    /// Bytes per row.
    public let rowBytes: Int
    private let storage: UnsafeRawPointer
    /// Whether ``storage`` was allocated here (else it belongs to ``owner``'s mapping).
    private let ownsStorage: Bool
    /// What keeps borrowed bytes valid (the ``GGUFFile`` whose map they are in).
    private let owner: AnyObject?
    /// Row `i` of the matrix is row `rowOrder[i]` of the bytes; nil for the identity.
    private let rowOrder: [Int]?
    /// ``rowOrder`` for the C kernel.
    private let rowOrder64: [Int64]?
    /// The blocks' scales (and Q4_1 minimums) copied out contiguously per row, which the AVX-512 kernels (float32
    /// and int8) load 16 at a time; built on the first direct product (4 bytes per Q4_1 block of 20, 2 per Q8_0
    /// block of 34).
    private var blockScales: [UInt16]?
    /// The fast mode's copy of a Q4_1 / Q8_0 matrix as tiles of 16 rows interleaved block by block
    /// (`cgraft_ggml_tiles`, rows already in ``rowOrder``), built on the first int8 product where the CPU has
    /// AVX2 or AVX-512 VNNI. The file's pages of the original blocks are released then: the copy takes their place.
    private var tiles: UnsafeMutableRawPointer?
    /// ``tiles``' size in bytes.
    private var tileBytes = 0
    /// Whether ``tiles`` was decided (built, or not to be built).
    private var tilesDecided = false
    /// Guards the tables built on first use (``blockScales``, ``tiles``).
    private let lazyLock = NSLock()

    /// A matrix over a GGUF tensor's bytes. `bytes` holds `rows` rows of `cols` elements of `type`; when
    /// `rowOrder` is given, row `i` of the matrix is row `rowOrder[i]` of `bytes`. With `borrowingFrom` the bytes
    /// are read in place for as long as the matrix lives and that object (which must keep them valid) is kept
    /// alive; without it they are copied. Throws naming `name` when the format cannot be decoded or the sizes do
    /// not add up.
    public init(name: String, type: GGMLType, rows: Int, cols: Int, bytes: UnsafeRawBufferPointer,
                rowOrder: [Int]? = nil, borrowingFrom owner: AnyObject? = nil) throws {
        guard type.canDequantize else {
            throw GraftError(.unsupported, "tensor '\(name)': Graft cannot decode \(type.name) yet")
        }
        guard rows > 0, cols > 0, cols % type.blockSize == 0 else {
            throw GraftError.format("tensor '\(name)': [\(rows), \(cols)] rows are not whole \(type.name) blocks of \(type.blockSize)")
        }
        let rowBytes = cols / type.blockSize * type.typeSize
        guard bytes.count == rows * rowBytes, let source = bytes.baseAddress else {
            throw GraftError.format("tensor '\(name)': \(bytes.count) bytes, expected \(rows * rowBytes) for [\(rows), \(cols)] \(type.name)")
        }
        if let rowOrder {
            guard rowOrder.count == rows, Set(rowOrder).count == rows, rowOrder.allSatisfy({ (0..<rows).contains($0) }) else {
                throw GraftError.invalid("tensor '\(name)': the row order is not a permutation of its \(rows) rows")
            }
        }
        self.type = type
        self.rows = rows
        self.cols = cols
        self.rowBytes = rowBytes
        self.rowOrder = rowOrder
        rowOrder64 = rowOrder?.map(Int64.init)
        self.owner = owner
        if owner != nil {
            storage = source
            ownsStorage = false
        } else {
            let copy = UnsafeMutableRawPointer.allocate(byteCount: rows * rowBytes, alignment: 64)
            copy.copyMemory(from: source, byteCount: rows * rowBytes)
            storage = UnsafeRawPointer(copy)
            ownsStorage = true
        }
    }

    deinit {
        if ownsStorage { UnsafeMutableRawPointer(mutating: storage).deallocate() }
        tiles?.deallocate()
    }

    /// Bytes held: the blocks (not once tiles replace a file's blocks), the tiles and the scale table once built.
    public var residentBytes: Int {
        lazyLock.lock()
        defer { lazyLock.unlock() }
        let blocks = tiles != nil && !ownsStorage ? 0 : rows * rowBytes
        return blocks + tileBytes + (blockScales?.count ?? 0) * 2
    }

    /// The format's name (`Q4_1`).
    public var formatName: String { type.name }

    /// Q4_1 and Q8_0 multiply straight from their blocks (`cgraft_ggml_rows_product`).
    public var hasDirectProduct: Bool { type == .q4_1 || type == .q8_0 }

    /// Adds `x · Wᵀ` for `outputRows` from the blocks, on the calling thread.
    public func accumulateProduct(_ x: UnsafePointer<Float>, rows m: Int, outputRows: Range<Int>,
                                  into y: UnsafeMutablePointer<Float>, ldy: Int) {
        guard hasDirectProduct, !outputRows.isEmpty else { return }
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: max(1, m * cols / 32))
        defer { scratch.deallocate() }
        let bytes = storage.assumingMemoryBound(to: UInt8.self), table = scaleTable()
        let run = { (order: UnsafePointer<Int64>?, scales: UnsafePointer<UInt16>?) in
            _ = cgraft_ggml_rows_product(Int32(self.type.rawValue), bytes, Int64(self.rowBytes), order, scales,
                                         Int64(outputRows.lowerBound), Int64(outputRows.upperBound), Int64(self.cols), x,
                                         Int64(self.cols), Int64(m), y, Int64(ldy), scratch)
        }
        table.withUnsafeBufferPointer { buffer in
            let scales = buffer.isEmpty ? nil : buffer.baseAddress
            if let rowOrder64 { rowOrder64.withUnsafeBufferPointer { run($0.baseAddress, scales) } } else { run(nil, scales) }
        }
    }

    /// Q4_1 and Q8_0 also multiply int8 activations (`cgraft_ggml_rows_product_q8`, the fast mode).
    public var hasInt8Product: Bool { hasDirectProduct }

    /// Adds `x · Wᵀ` for `outputRows` from the blocks and the int8 activations `x`, on the calling thread.
    public func accumulateInt8Product(_ x: Int8Rows, outputRows: Range<Int>, into y: UnsafeMutablePointer<Float>, ldy: Int) {
        guard hasInt8Product, !outputRows.isEmpty, x.cols == cols else { return }
        if let tiles = tiledBlocks() {
            _ = cgraft_ggml_tiles_product_q8(Int32(type.rawValue), tiles, Int64(rows), Int64(outputRows.lowerBound),
                                             Int64(outputRows.upperBound), Int64(cols), x.values, x.scales, x.sums,
                                             Int64(x.rows), y, Int64(ldy))
            return
        }
        let bytes = storage.assumingMemoryBound(to: UInt8.self), table = scaleTable()
        let run = { (order: UnsafePointer<Int64>?, scales: UnsafePointer<UInt16>?) in
            _ = cgraft_ggml_rows_product_q8(Int32(self.type.rawValue), bytes, Int64(self.rowBytes), order, scales,
                                            Int64(outputRows.lowerBound), Int64(outputRows.upperBound), Int64(self.cols),
                                            x.values, x.scales, x.sums, Int64(x.rows), y, Int64(ldy))
        }
        table.withUnsafeBufferPointer { buffer in
            let scales = buffer.isEmpty ? nil : buffer.baseAddress
            if let rowOrder64 { rowOrder64.withUnsafeBufferPointer { run($0.baseAddress, scales) } } else { run(nil, scales) }
        }
    }

    /// ``tiles``, built on first use; nil without AVX2 or AVX-512 VNNI (the tile kernels' instructions) or memory.
    private func tiledBlocks() -> UnsafePointer<UInt8>? {
        lazyLock.lock()
        defer { lazyLock.unlock() }
        if !tilesDecided {
            tilesDecided = true
            let kind = Int32(type.rawValue), size = Int(cgraft_ggml_tiles_size(kind, Int64(rows), Int64(cols)))
            guard cgraft_ggml_int8_kernel_level() >= 1, size > 0 else { return nil }
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
            let source = storage.assumingMemoryBound(to: UInt8.self), out = buffer.assumingMemoryBound(to: UInt8.self)
            let status = rowOrder64.map { order in
                order.withUnsafeBufferPointer {
                    cgraft_ggml_tiles(kind, source, Int64(rowBytes), $0.baseAddress, Int64(rows), Int64(cols), out)
                }
            } ?? cgraft_ggml_tiles(kind, source, Int64(rowBytes), nil, Int64(rows), Int64(cols), out)
            guard status == 0 else {
                buffer.deallocate()
                return nil
            }
            tiles = buffer
            tileBytes = size
            (owner as? GGUFFile)?.releaseResidentPages(UnsafeRawBufferPointer(start: storage, count: rows * rowBytes))
        }
        return tiles.map { UnsafePointer($0.assumingMemoryBound(to: UInt8.self)) }
    }

    /// ``blockScales``, built on first use (empty when the format has none).
    private func scaleTable() -> [UInt16] {
        lazyLock.lock()
        defer { lazyLock.unlock() }
        if let blockScales { return blockScales }
        let kind = Int32(type.rawValue)
        let count = Int(cgraft_ggml_block_scales_count(kind, Int64(rows), Int64(cols)))
        var table = [UInt16](repeating: 0, count: max(0, count))
        if count > 0 {
            let status = table.withUnsafeMutableBufferPointer {
                cgraft_ggml_block_scales(kind, storage.assumingMemoryBound(to: UInt8.self), Int64(rows), Int64(rowBytes),
                                         Int64(cols), $0.baseAddress)
            }
            if status != 0 { table = [] }
        }
        blockScales = table
        return table
    }

    /// Decodes rows `range` on the calling thread.
    public func decodeRows(_ range: Range<Int>, into destination: UnsafeMutablePointer<Float>) {
        guard !range.isEmpty else { return }
        // The format and sizes were validated at init, so decoding cannot fail here.
        guard let rowOrder else {
            try? type.dequantize(storage + range.lowerBound * rowBytes, into: destination, count: range.count * cols,
                                 parallel: false)
            return
        }
        for (i, row) in range.enumerated() {
            try? type.dequantize(storage + rowOrder[row] * rowBytes, into: destination + i * cols, count: cols, parallel: false)
        }
    }
}
