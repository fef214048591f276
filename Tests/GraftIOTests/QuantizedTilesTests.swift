import Testing
import Foundation
import CGraftKernels
import GraftIO
import GraftTensor
import GraftTestSupport

/// The fast mode's row-interleaved tiles (`cgraft_ggml_tiles`, 16 weight rows per tile): the tiled product gives
/// the same floats with the AVX-512 VNNI kernel, the AVX2 kernel and the portable loop, for any range of rows and
/// any number of activation rows, agrees with the row kernel on the file's blocks up to summation order, and
/// propagates NaN.
@Suite(.serialized) struct QuantizedTilesTests {
    /// `rows × cols` N(0, 0.05²) weights in `type`'s blocks.
    func blocks(_ type: GGMLType, rows: Int, cols: Int, seed: UInt64) throws -> [UInt8] {
        try QuantizedMatrixTests().matrix(type, rows: rows, cols: cols, seed: seed).1
    }

    /// `x · Wᵀ` for output rows `range` from tiles (zeros elsewhere), at kernel `level`.
    func tiledProduct(_ type: GGMLType, _ tiles: [UInt8], rows: Int, cols: Int, _ x: Int8Rows, _ range: Range<Int>,
                      level: Int32) -> [Float] {
        var y = [Float](repeating: 0, count: x.rows * rows)
        cgraft_ggml_limit_kernels(level)
        defer { cgraft_ggml_limit_kernels(2) }
        let status = tiles.withUnsafeBufferPointer { t in
            y.withUnsafeMutableBufferPointer { out in
                cgraft_ggml_tiles_product_q8(Int32(type.rawValue), t.baseAddress, Int64(rows), Int64(range.lowerBound),
                                             Int64(range.upperBound), Int64(cols), x.values, x.scales, x.sums,
                                             Int64(x.rows), out.baseAddress, Int64(rows))
            }
        }
        #expect(status == 0)
        return y
    }

    /// The same product from the file's row-major blocks (`cgraft_ggml_rows_product_q8`), rows in `order`.
    func rowProduct(_ type: GGMLType, _ bytes: [UInt8], order: [Int64], cols: Int, _ x: Int8Rows) -> [Float] {
        let rows = order.count, rowBytes = cols / type.blockSize * type.typeSize
        var y = [Float](repeating: 0, count: x.rows * rows)
        _ = bytes.withUnsafeBufferPointer { w in
            order.withUnsafeBufferPointer { o in
                y.withUnsafeMutableBufferPointer { out in
                    cgraft_ggml_rows_product_q8(Int32(type.rawValue), w.baseAddress, Int64(rowBytes), o.baseAddress, nil,
                                                0, Int64(rows), Int64(cols), x.values, x.scales, x.sums, Int64(x.rows),
                                                out.baseAddress, Int64(rows))
                }
            }
        }
        return y
    }

    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func tiledProductsAreTheRowProductsInAnyRangeAndAtEveryLevel(type: GGMLType) throws {
        var rng = GraftRNG(seed: 31)
        let cols = 576
        // Whole tiles, a partial last tile, fewer rows than one tile.
        for rows in [608, 103, 7] {
            let bytes = try blocks(type, rows: rows, cols: cols, seed: UInt64(rows))
            let order = (0..<rows).map { Int64(($0 * 37) % rows) }
            let size = Int(cgraft_ggml_tiles_size(Int32(type.rawValue), Int64(rows), Int64(cols)))
            #expect(size == (rows + 15) / 16 * 16 * (cols / 32) * type.typeSize)
            var tiles = [UInt8](repeating: 0, count: size)
            let made = bytes.withUnsafeBufferPointer { w in
                order.withUnsafeBufferPointer { o in
                    tiles.withUnsafeMutableBufferPointer {
                        cgraft_ggml_tiles(Int32(type.rawValue), w.baseAddress, Int64(cols / 32 * type.typeSize),
                                          o.baseAddress, Int64(rows), Int64(cols), $0.baseAddress)
                    }
                }
            }
            #expect(made == 0)
            for m in [1, 3, 16, 21] {
                let x = Tensor.randomNormal([m, cols], rng: &rng)
                let q8 = try Int8Rows(x.pointer, rows: m, cols: cols)
                let whole = tiledProduct(type, tiles, rows: rows, cols: cols, q8, 0..<rows, level: 2)
                let reference = rowProduct(type, bytes, order: order, cols: cols, q8)
                let scale = reference.map(abs).max() ?? 1
                let err = zip(whole, reference).map { abs($0 - $1) }.max() ?? .infinity
                #expect(err <= 1e-5 * scale, "\(type.name) \(rows) rows m=\(m): tiled vs row kernel \(err)")
                #expect(whole.allSatisfy { $0.isFinite })
                let portable = tiledProduct(type, tiles, rows: rows, cols: cols, q8, 0..<rows, level: 0)
                #expect(zip(whole, portable).allSatisfy { $0.bitPattern == $1.bitPattern },
                        "\(type.name) \(rows) rows m=\(m): the portable loop differs from the level-\(cgraft_ggml_int8_kernel_level()) kernel")
                let avx2 = tiledProduct(type, tiles, rows: rows, cols: cols, q8, 0..<rows, level: 1)
                #expect(zip(avx2, portable).allSatisfy { $0.bitPattern == $1.bitPattern },
                        "\(type.name) \(rows) rows m=\(m): the portable loop differs from the AVX2 kernel")
                // Ranges that start and end inside tiles fill exactly their rows, with the same bits.
                var pieces = [Float](repeating: 0, count: m * rows)
                var start = 0
                while start < rows {
                    let end = min(rows, start + 1 + Int(rng.next() % 40))
                    let part = tiledProduct(type, tiles, rows: rows, cols: cols, q8, start..<end, level: 2)
                    for i in 0..<m {
                        for r in 0..<rows where !(start..<end).contains(r) { #expect(part[i * rows + r] == 0) }
                        for r in start..<end { pieces[i * rows + r] = part[i * rows + r] }
                    }
                    start = end
                }
                #expect(zip(whole, pieces).allSatisfy { $0.bitPattern == $1.bitPattern }, "\(type.name) \(rows) rows m=\(m): split ranges")
            }
            // NaN in one activation row reaches that row's outputs only; bad ranges are refused untouched.
            let x = Tensor.randomNormal([2, cols], rng: &rng)
            let q8 = try Int8Rows(x.pointer, rows: 2, cols: cols)
            q8.scales[1] = .nan
            let y = tiledProduct(type, tiles, rows: rows, cols: cols, q8, 0..<rows, level: 2)
            #expect(y[0..<rows].allSatisfy { $0.isNaN } && y[rows...].allSatisfy { $0.isFinite })
            var untouched = [Float](repeating: 7, count: 2 * rows)
            let refused = tiles.withUnsafeBufferPointer { t in
                untouched.withUnsafeMutableBufferPointer {
                    cgraft_ggml_tiles_product_q8(Int32(type.rawValue), t.baseAddress, Int64(rows), 0, Int64(rows + 1),
                                                 Int64(cols), q8.values, q8.scales, q8.sums, 2, $0.baseAddress, Int64(rows))
                }
            }
            #expect(refused == -1 && untouched.allSatisfy { $0 == 7 })
        }
        #expect(cgraft_ggml_tiles_size(Int32(GGMLType.f16.rawValue), 16, 64) == -1)
        #expect(cgraft_ggml_tiles_size(Int32(type.rawValue), 16, 30) == -1)
    }

    /// The largest integer products the formats allow (Q8_0 bytes of -128 and 127, Q4_1 nibbles of 15, against
    /// activations of ±127) stay exact in the AVX2 kernel, whose byte pairs sum in 16 bits: every level the CPU has
    /// gives the portable loop's floats, and those hold the exact integer dot times the scales. (A level the CPU
    /// lacks runs the portable loop, so there the comparison holds trivially and the exact values still count.)
    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func extremeBlocksDoNotSaturate(type: GGMLType) throws {
        let rows = 16, cols = 64, blocks = cols / 32
        var bytes = [UInt8]()
        for r in 0..<rows {
            for _ in 0..<blocks {
                // Scale 1.0 (half 0x3C00), minimum 0 for Q4_1.
                bytes += [0x00, 0x3C]
                if type == .q4_1 { bytes += [0x00, 0x00] + [UInt8](repeating: 0xFF, count: 16) }
                else { bytes += (0..<32).map { r % 2 == 0 ? 0x80 : ($0 % 2 == 0 ? 0x7F : 0x80) } }
            }
        }
        let size = Int(cgraft_ggml_tiles_size(Int32(type.rawValue), Int64(rows), Int64(cols)))
        var tiles = [UInt8](repeating: 0, count: size)
        let made = bytes.withUnsafeBufferPointer { w in
            tiles.withUnsafeMutableBufferPointer {
                cgraft_ggml_tiles(Int32(type.rawValue), w.baseAddress, Int64(blocks * type.typeSize), nil, Int64(rows),
                                  Int64(cols), $0.baseAddress)
            }
        }
        #expect(made == 0)
        for sign: Float in [1, -1] {
            // Alternating ±1 activations quantize to ±127 (scale 1/127); all the same sign, to 127 · sign.
            for alternate in [false, true] {
                let x = Tensor(shape: [2, cols], values: (0..<2 * cols).map { alternate && $0 % 2 == 1 ? -sign : sign })
                let q8 = try Int8Rows(x.pointer, rows: 2, cols: cols)
                let portable = tiledProduct(type, tiles, rows: rows, cols: cols, q8, 0..<rows, level: 0)
                for level: Int32 in [1, 2] {
                    let y = tiledProduct(type, tiles, rows: rows, cols: cols, q8, 0..<rows, level: level)
                    let same = zip(y, portable).allSatisfy { $0.bitPattern == $1.bitPattern }
                    #expect(y.allSatisfy { $0.isFinite } && same,
                            "\(type.name) level \(level) sign \(sign) alternate \(alternate): \(y.prefix(4))")
                }
                // With every activation 127 · sign (scale 1/127), a block's exact dot is Σw · 127 · sign: rows of
                // 32 × -128 in Q8_0, 32 × 15 in Q4_1 (minimum 0). Saturating pair sums would fall short of it.
                if !alternate {
                    let perBlock: Float = type == .q8_0 ? -128 * 32 : 15 * 32
                    let expected = Float(blocks) * perBlock * 127 * sign / 127
                    for i in 0..<2 {
                        #expect(abs(portable[i * rows] - expected) <= 1e-4 * abs(expected),
                                "\(type.name) row 0 of activation row \(i): \(portable[i * rows]) vs \(expected)")
                    }
                }
            }
        }
    }

    /// A QuantizedMatrix switches to tiles on its first int8 product where the CPU has AVX2 or VNNI: its resident bytes
    /// then count the tiles, and its products stay within summation order of the dequantized weight.
    @Test func aMatrixCountsItsTilesOnceBuilt() throws {
        let rows = 96, cols = 128, type = GGMLType.q4_1
        let bytes = try blocks(type, rows: rows, cols: cols, seed: 5)
        let q = try bytes.withUnsafeBytes { try QuantizedMatrix(name: "t", type: type, rows: rows, cols: cols, bytes: $0) }
        let before = q.residentBytes
        #expect(before == bytes.count)
        var rng = GraftRNG(seed: 6)
        let x = Tensor.randomNormal([4, cols], rng: &rng)
        let y = withInt8Activations { linear(x, frozen: q) }
        let exact = linear(x, q.dequantized())
        #expect(maxAbsDifference(y, exact) <= 0.05, "int8 activations move a product by at most their rounding")
        #expect((0..<y.count).allSatisfy { y.pointer[$0].isFinite })
        if cgraft_ggml_int8_kernel_level() >= 1 {
            #expect(q.residentBytes >= before + bytes.count, "the tiles (\(bytes.count) bytes) are counted: \(q.residentBytes)")
        }
    }
}
