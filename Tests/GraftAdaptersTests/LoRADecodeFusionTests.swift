import Testing
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// A decoding step on a quantized base adds plain LoRA's update inside the base product's threads
/// (``LoRALayer/decodeUpdate(input:layer:)``, run by ``Linear`` as the product's epilogue). The result must be the
/// base product plus `(α/r)·B A x` computed from the definition, in the exact and the fast (int8) mode, for every
/// block format, whichever branch of the frozen product runs.
@Suite(.serialized) struct LoRADecodeFusionTests {
    // 600 output rows split over both threads in chunks of 64; 1024 inputs are whole blocks of 32.
    let inF = 1024, outF = 600, rank = 16

    func quantized(_ type: GGMLType, seed: UInt64) throws -> QuantizedMatrix {
        let values = randomValues(outF * inF, seed: seed, scale: 0.05).map(Float.init)
        var bytes = [UInt8](repeating: 0, count: outF * inF / type.blockSize * type.typeSize)
        try values.withUnsafeBufferPointer { src in
            try bytes.withUnsafeMutableBytes { dst in
                guard let s = src.baseAddress, let d = dst.baseAddress else { return }
                try type.quantize(s, into: d, count: values.count)
            }
        }
        return try bytes.withUnsafeBytes { try QuantizedMatrix(name: "blk.0.attn_q.weight", type: type, rows: outF, cols: inF, bytes: $0) }
    }

    /// The largest |(out − base) − update| over `rows` rows, the update `s · B (A x)` computed in float64 from `a`
    /// and `b`, and the largest |update|. A NaN or infinity in `out` gives an infinite error.
    func worstUpdateError(_ out: Tensor, base: Tensor, x xv: [Double], rows: Int, a: [Double], b: [Double],
                          scale s: Double) -> (error: Double, largest: Double) {
        var worst = 0.0, largest = 0.0
        for i in 0..<rows {
            var h = [Double](repeating: 0, count: rank)
            for k in 0..<rank { for j in 0..<inF { h[k] += a[k * inF + j] * xv[i * inF + j] } }
            for o in 0..<outF {
                var update = 0.0
                for k in 0..<rank { update += s * b[o * rank + k] * h[k] }
                let got = Double(out.scalars[i * outF + o]) - Double(base.scalars[i * outF + o])
                worst = got.isFinite ? max(worst, abs(got - update)) : .infinity
                largest = max(largest, abs(update))
            }
        }
        return (worst, largest)
    }

    @Test(arguments: [GGMLType.q4_1, .q8_0, .f16], [false, true])
    func fusedUpdateMatchesTheDefinition(type: GGMLType, fast: Bool) throws {
        Threading.setThreads(2)
        let matrix = try quantized(type, seed: 71)
        let bias = Tensor(shape: [outF], values: randomValues(outF, seed: 72).map(Float.init))
        let layer = Linear(compact: matrix, bias: bias)
        let lora = LoRALayer(base: layer, rank: rank, alpha: 24, useRSLoRA: false, dropout: 0, useDoRA: false,
                             initLoraWeights: false, bias: false, state: AdapterState(seed: 9))
        layer.adapters = [lora]
        let a = lora.loraA.scalars.map(Double.init), b = lora.loraB.scalars.map(Double.init), s = Double(lora.scaling)
        for rows in [1, 2, 3] {
            let xv = randomValues(rows * inF, seed: UInt64(80 + rows))
            let x = Tensor(shape: [rows, inF], values: xv.map(Float.init))
            let (out, baseOut, fused) = withInt8Activations(fast) {
                withNoGrad { (layer.forward(x), linear(x, frozen: matrix, bias), lora.decodeUpdate(input: x, layer: layer) != nil) }
            }
            // One or two rows take the fused path; more run the base product and then the update.
            #expect(fused == (rows <= 2), "\(rows) rows: fused \(fused)")
            let (worst, scale) = worstUpdateError(out, base: baseOut, x: xv, rows: rows, a: a, b: b, scale: s)
            print("LoRA decode fusion \(type) \(fast ? "fast" : "exact"), \(rows) row(s): max |error| \(worst), largest update \(scale)")
            #expect(scale > 0.1, "the update is too small to test")
            #expect(worst <= 1e-5 * scale, "\(type) \(fast ? "fast" : "exact") \(rows) rows: max |error| \(worst)")
        }
    }

    /// Fast-mode decoding inside a ``HalfPrecisionCopies`` scope reads A and B rounded to float16: the fused update
    /// must match the definition computed from the rounded factors (and differ from the float32 one by no more
    /// than that rounding allows), for one and two rows; outside a scope the float32 factors are read.
    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func fastModeReadsFloat16FactorsInsideAScope(type: GGMLType) throws {
        Threading.setThreads(2)
        let matrix = try quantized(type, seed: 91)
        let layer = Linear(compact: matrix, bias: nil)
        let lora = LoRALayer(base: layer, rank: rank, alpha: 32, useRSLoRA: false, dropout: 0, useDoRA: false,
                             initLoraWeights: false, bias: false, state: AdapterState(seed: 5))
        layer.adapters = [lora]
        let s = Double(lora.scaling)
        let exactA = lora.loraA.scalars.map(Double.init), exactB = lora.loraB.scalars.map(Double.init)
        let halfA = lora.loraA.scalars.map { Double(Float(Float16($0))) }
        let halfB = lora.loraB.scalars.map { Double(Float(Float16($0))) }
        #expect(zip(exactA, halfA).contains { $0 != $1 }, "rounding to float16 changed nothing: the test would not tell")
        for rows in [1, 2] {
            let xv = randomValues(rows * inF, seed: UInt64(90 + rows))
            let x = Tensor(shape: [rows, inF], values: xv.map(Float.init))
            let (scoped, plain, baseOut, bytes) = withNoGrad {
                withInt8Activations {
                    let copies = HalfPrecisionCopies()
                    let scoped = withHalfPrecisionCopies(copies) { layer.forward(x) }
                    return (scoped, layer.forward(x), linear(x, frozen: matrix, nil), copies.bytes)
                }
            }
            #expect(bytes == 2 * (lora.loraA.count + lora.loraB.count))  // A as is, B transposed
            func worstError(_ out: Tensor, a: [Double], b: [Double]) -> (Double, Double) {
                worstUpdateError(out, base: baseOut, x: xv, rows: rows, a: a, b: b, scale: s)
            }
            let (halfError, scale) = worstError(scoped, a: halfA, b: halfB)
            let (halfVsExact, _) = worstError(scoped, a: exactA, b: exactB)
            let (plainError, _) = worstError(plain, a: exactA, b: exactB)
            print("LoRA fast decode \(type), \(rows) row(s): float16 factors max |error| \(halfError) vs their definition, \(halfVsExact) vs float32's; outside a scope \(plainError); largest update \(scale)")
            #expect(scale > 0.1, "the update is too small to test")
            #expect(halfError <= 1e-5 * scale)
            #expect(plainError <= 1e-5 * scale)
            // Rounding to float16 moves each factor by at most 2^-11 of itself: the update by about 1e-3 of its size.
            #expect(halfVsExact > 1e-5 * scale && halfVsExact <= 4e-3 * scale)
        }
    }
}
