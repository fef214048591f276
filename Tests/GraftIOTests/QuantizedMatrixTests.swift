import Testing
import Foundation
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
        for m in [1, 3, 5, 8] {
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

    /// The fast mode: activations quantized per block of 32 to int8 (each within half a step of its value), then
    /// integer products at every kernel level the CPU has (AVX-512 VNNI, AVX2, portable) equal to float32
    /// products of the dequantized weight with the dequantized activations `d·q`, row order included.
    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func int8ProductsMatchTheDequantizedOperands(type: GGMLType) throws {
        var rng = GraftRNG(seed: 11)
        let rows = 200, cols = 576, blocks = cols / 32
        let order = (0..<rows).map { ($0 * 37) % rows }
        let (q, _) = try matrix(type, rows: rows, cols: cols, seed: 23, rowOrder: order)
        #expect(q.hasInt8Product)
        let w = q.dequantized()
        print("int8 kernel level on this CPU: \(cgraft_ggml_int8_kernel_level()) (2 = AVX-512 VNNI, 1 = AVX2, 0 = portable)")
        // 21 rows: a prompt's worth, beyond the float32 path's direct-product limit; the fast mode takes it too.
        for m in [1, 3, 8, 21] {
            let x = Tensor.randomNormal([m, cols], rng: &rng)
            let q8 = try Int8Rows(x.pointer, rows: m, cols: cols)
            let xhat = Tensor(zeros: [m, cols])
            for i in 0..<m {
                for b in 0..<blocks {
                    let d = q8.scales[i * blocks + b]
                    var amax: Float = 0, sum: Float = 0
                    for j in 0..<32 {
                        let k = i * cols + b * 32 + j
                        amax = max(amax, abs(x.pointer[k]))
                        xhat.pointer[k] = d * Float(q8.values[k])
                        sum += xhat.pointer[k]
                        #expect(abs(xhat.pointer[k] - x.pointer[k]) <= d * 0.5001, "element \(k) quantized off by more than half a step")
                    }
                    #expect(abs(d - amax / 127) <= 1e-6 * amax && abs(q8.sums[i * blocks + b] - sum) <= 1e-4)
                }
            }
            let reference = linear(xhat, w), unquantized = linear(x, w)
            // |Σ_k W[r, k] (x̂ − x)_k| ≤ Σ_k |W[r, k]| · d_k / 2: the most quantizing the activations can move a product.
            var bound = [Float](repeating: 0, count: m * rows)
            for i in 0..<m {
                for r in 0..<rows {
                    for k in 0..<cols { bound[i * rows + r] += abs(w.pointer[r * cols + k]) * q8.scales[i * blocks + k / 32] / 2 }
                }
            }
            for level: Int32 in [2, 1, 0] {
                cgraft_ggml_limit_kernels(level)
                let y = withInt8Activations { linear(x, frozen: q) }
                cgraft_ggml_limit_kernels(2)
                let err = maxAbsDifference(y, reference)
                #expect(err <= 1e-4, "\(type.name) m=\(m) int8 level \(level): \(err)")
                let outside = (0..<(m * rows)).filter { abs(y.pointer[$0] - unquantized.pointer[$0]) > bound[$0] + 1e-4 }
                #expect(outside.isEmpty, "\(type.name) m=\(m) int8 level \(level): \(outside.count) products beyond the quantization bound")
                #expect((0..<y.count).allSatisfy { y.pointer[$0].isFinite })
            }
            #expect(maxAbsDifference(linear(x, frozen: q), linear(x, w)) <= 1e-4, "the exact mode stays the default")
        }
        let odd = Tensor(zeros: [1, 30])
        #expect(throws: GraftError.self) { try Int8Rows(odd.pointer, rows: 1, cols: 30) }
    }

    /// A row's products are the same bits alone or among other rows, at every kernel level, in both modes: what
    /// lets a sequence get its own tokens when batched with others (graftd's continuous batching). A width of 1600
    /// takes the AVX2 batch kernel's stretches of 768, 768 and 64 columns.
    @Test(arguments: [GGMLType.q4_1, .q8_0], [576, 1600])
    func aRowsProductsDoNotDependOnTheRowsBesideIt(type: GGMLType, cols: Int) throws {
        var rng = GraftRNG(seed: 13)
        let rows = 103
        let (q, _) = try matrix(type, rows: rows, cols: cols, seed: 25, rowOrder: (0..<rows).map { ($0 * 41) % rows })
        for m in [2, 3, 4, 5, 9, 12, 16] {
            let x = Tensor.randomNormal([m, cols], rng: &rng)
            for level: Int32 in [2, 1, 0] {
                cgraft_ggml_limit_kernels(level)
                for int8 in [false, true] {
                    let batched = withInt8Activations(int8) { linear(x, frozen: q) }
                    for i in 0..<m {
                        let alone = withInt8Activations(int8) { linear(x.rowsView(i..<(i + 1)), frozen: q) }
                        let same = (0..<rows).allSatisfy { alone.pointer[$0].bitPattern == batched.pointer[i * rows + $0].bitPattern }
                        #expect(same, "\(type.name) level \(level) \(int8 ? "int8" : "float32") m=\(m): row \(i) differs from its product alone")
                    }
                }
                cgraft_ggml_limit_kernels(2)
            }
        }
    }

    /// A micro-measurement of the decoding products, reported per kernel level: ns per output row of a
    /// `[1536, 576]` matrix times one activation row (thread CPU time, so other processes on the machine matter
    /// little), float32 activations and int8 activations.
    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func decodeProductTimings(type: GGMLType) throws {
        var rng = GraftRNG(seed: 12)
        let rows = 1536, cols = 576, repeats = 200
        let (q, _) = try matrix(type, rows: rows, cols: cols, seed: 24)
        let x = Tensor.randomNormal([1, cols], rng: &rng)
        let q8 = try Int8Rows(x.pointer, rows: 1, cols: cols)
        let y = Tensor(zeros: [1, rows])
        func cpuSeconds() -> Double {
            var t = timespec()
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
            return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
        }
        var report: [String] = []
        for level: Int32 in [2, 1, 0] {
            cgraft_ggml_limit_kernels(level)
            for int8 in [false, true] {
                let n = level == 0 ? repeats / 10 : repeats
                let start = cpuSeconds()
                for _ in 0..<n {
                    if int8 {
                        q.accumulateInt8Product(q8, outputRows: 0..<rows, into: y.pointer, ldy: rows)
                    } else {
                        q.accumulateProduct(x.pointer, rows: 1, outputRows: 0..<rows, into: y.pointer, ldy: rows)
                    }
                }
                let ns = (cpuSeconds() - start) / Double(n * rows) * 1e9
                report.append("level \(level) \(int8 ? "int8" : "f32 "): \(String(format: "%.1f", ns)) ns/row")
            }
        }
        cgraft_ggml_limit_kernels(2)
        print("\(type.name) [\(rows), \(cols)] × 1 row, one thread: " + report.joined(separator: ", "))
        #expect((0..<rows).allSatisfy { y.pointer[$0].isFinite })
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
