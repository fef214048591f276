import Testing
import CGraftKernels
import GraftIO
import GraftTensor
import GraftTestSupport

/// Frozen weights kept in a GGUF block format (issue 13, item 1): ``linear(_:frozen:_:)`` multiplies exactly the
/// float32 values the format decodes to, forward and for the input gradient, so it agrees with the float32 layer
/// on the dequantized weight up to summation order.
@Suite struct QuantizedMatrixTests {
    /// A `[rows, cols]` matrix of N(0, 0.05²) values encoded in `type`, with `rowOrder` applied at load.
    func matrix(_ type: GGMLType, rows: Int, cols: Int, seed: UInt64, rowOrder: [Int]? = nil) throws -> (QuantizedMatrix, [UInt8]) {
        var rng = GraftRNG(seed: seed)
        let values = (0..<(rows * cols)).map { _ in rng.nextNormal() * 0.05 }
        var bytes = [UInt8](repeating: 0, count: rows * cols / type.blockSize * type.typeSize)
        try values.withUnsafeBufferPointer { src in
            try bytes.withUnsafeMutableBytes { dst in
                guard let s = src.baseAddress, let d = dst.baseAddress else { return }
                try type.quantize(s, into: d, count: values.count)
            }
        }
        let m = try bytes.withUnsafeBytes {
            try QuantizedMatrix(name: "test", type: type, rows: rows, cols: cols, bytes: $0, rowOrder: rowOrder)
        }
        return (m, bytes)
    }

    @Test(arguments: [GGMLType.q4_1, .q8_0, .f16])
    func forwardAndInputGradientMatchTheDequantizedWeight(type: GGMLType) throws {
        var rng = GraftRNG(seed: 7)
        // Wide and narrow layers, one or many rows of input (decoding is one row), several tiles of output rows.
        for (rowsN, inF, outF) in [(1, 64, 96), (37, 576, 1536), (130, 1536, 576), (3, 32, 17)] {
            let (q, _) = try matrix(type, rows: outF, cols: inF, seed: UInt64(inF + outF))
            let w = q.dequantized()
            #expect(w.shape == [outF, inF])
            let bias = Tensor.randomNormal([outF], rng: &rng).requiringGrad()
            let x = Tensor.randomNormal([rowsN, inF], rng: &rng).requiringGrad()
            let r = Tensor.randomNormal([rowsN, outF], rng: &rng)
            let y = linear(x, frozen: q, bias)
            sum(mul(y, r)).backward()
            let dx = try #require(x.grad), db = try #require(bias.grad)

            let x2 = x.detached().requiringGrad(), bias2 = bias.detached().requiringGrad()
            let y2 = linear(x2, w, bias2)
            sum(mul(y2, r)).backward()
            let dx2 = try #require(x2.grad), db2 = try #require(bias2.grad)
            let tolerance: Float = 1e-4
            #expect(maxAbsDifference(y, y2) <= tolerance, "forward \(rowsN)×\(inF)→\(outF) \(type.name)")
            #expect(maxAbsDifference(dx, dx2) <= tolerance, "input gradient \(rowsN)×\(inF)→\(outF) \(type.name)")
            #expect(maxAbsDifference(db, db2) <= tolerance, "bias gradient")
            #expect((0..<y.count).allSatisfy { y.pointer[$0].isFinite } && (0..<dx.count).allSatisfy { dx.pointer[$0].isFinite })
        }
    }

    /// Decoding steps (up to 8 rows) multiply straight from Q4_1/Q8_0 blocks, with the AVX-512 and AVX2 kernels
    /// and the portable loop alike (each level the CPU has), row order included.
    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func directBlockProductsMatchTheDequantizedWeight(type: GGMLType) throws {
        var rng = GraftRNG(seed: 9)
        let rows = 200, cols = 576
        let order = (0..<rows).map { ($0 * 37) % rows }
        let (q, _) = try matrix(type, rows: rows, cols: cols, seed: 21, rowOrder: order)
        #expect(q.hasDirectProduct)
        let w = q.dequantized()
        for m in [1, 3, 8] {
            let x = Tensor.randomNormal([m, cols], rng: &rng)
            let reference = linear(x, w)
            for level: Int32 in [2, 1, 0] {
                cgraft_ggml_limit_kernels(level)
                let y = linear(x, frozen: q)
                cgraft_ggml_limit_kernels(2)
                let err = maxAbsDifference(y, reference)
                #expect(err <= 1e-4, "\(type.name) m=\(m) kernel level \(level): \(err)")
            }
        }
    }

    @Test func rowOrderPicksSourceRowsAndBadInputIsRefusedByName() throws {
        let order = [2, 0, 3, 1]
        let (plain, bytes) = try matrix(.q8_0, rows: 4, cols: 64, seed: 3)
        let reordered = try bytes.withUnsafeBytes {
            try QuantizedMatrix(name: "test", type: .q8_0, rows: 4, cols: 64, bytes: $0, rowOrder: order)
        }
        let a = plain.dequantized(), b = reordered.dequantized()
        for (i, from) in order.enumerated() {
            #expect((0..<64).allSatisfy { b.pointer[i * 64 + $0] == a.pointer[from * 64 + $0] })
        }
        #expect(reordered.residentBytes == 4 * 2 * 34)
        let short = [UInt8](repeating: 0, count: 10)
        let error = #expect(throws: GraftError.self) {
            try short.withUnsafeBytes { try QuantizedMatrix(name: "blk.0.attn_q.weight", type: .q8_0, rows: 4, cols: 64, bytes: $0) }
        }
        #expect(error?.message.contains("blk.0.attn_q.weight") == true)
        #expect(throws: GraftError.self) {
            try bytes.withUnsafeBytes { try QuantizedMatrix(name: "t", type: .q8_0, rows: 4, cols: 64, bytes: $0, rowOrder: [0, 0, 1, 2]) }
        }
        #expect(throws: GraftError.self) {
            try bytes.withUnsafeBytes { try QuantizedMatrix(name: "t", type: .q8_0, rows: 8, cols: 30, bytes: $0) }
        }
    }
}
