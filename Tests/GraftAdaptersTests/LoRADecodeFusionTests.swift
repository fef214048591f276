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
        try randomQuantizedMatrix(type, rows: outF, cols: inF, seed: seed)
    }

    /// A layer of random `type` weights (`seed`) on two threads with one LoRA attached (alpha 32, drawn from
    /// `loraSeed` with B not zero).
    func adaptedLayer(_ type: GGMLType = .q8_0, seed: UInt64, loraSeed: UInt64) throws
        -> (matrix: QuantizedMatrix, layer: Linear, lora: LoRALayer) {
        Threading.setThreads(2)
        let matrix = try quantized(type, seed: seed)
        let layer = Linear(compact: matrix, bias: nil)
        let lora = LoRALayer(base: layer, rank: rank, alpha: 32, useRSLoRA: false, dropout: 0, useDoRA: false,
                             initLoraWeights: false, bias: false, state: AdapterState(seed: loraSeed))
        layer.adapters = [lora]
        return (matrix, layer, lora)
    }

    /// The largest |(out − base) − update| over `rows` rows, the update `s · B (A x)` computed in float64 from `a`
    /// and `b`, and the largest |update|. A NaN or infinity in `out` gives an infinite error.
    func worstUpdateError(_ out: Tensor, base: Tensor, x xv: [Double], rows: Int, a: [Double], b: [Double],
                          scale s: Double, rank: Int = 16) -> (error: Double, largest: Double) {
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

    /// Ranks 16 and 6: the down projection's parts (four components each, shared out over the threads) then end on
    /// a whole group of four and on a part of two.
    @Test(arguments: [GGMLType.q4_1, .q8_0, .f16], [false, true])
    func fusedUpdateMatchesTheDefinition(type: GGMLType, fast: Bool) throws {
        for rank in [16, 6] { try fusedUpdateMatchesTheDefinition(type: type, fast: fast, rank: rank) }
    }

    func fusedUpdateMatchesTheDefinition(type: GGMLType, fast: Bool, rank: Int) throws {
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
            let (worst, scale) = worstUpdateError(out, base: baseOut, x: xv, rows: rows, a: a, b: b, scale: s,
                                                  rank: rank)
            print("LoRA decode fusion \(type) \(fast ? "fast" : "exact") rank \(rank), \(rows) row(s): "
                  + "max |error| \(worst), largest update \(scale)")
            #expect(scale > 0.1, "the update is too small to test")
            #expect(worst <= 1e-5 * scale, "\(type) \(fast ? "fast" : "exact") \(rows) rows: max |error| \(worst)")
        }
    }

    /// `values` (a row-major float32 matrix of `rows` rows) rounded to symmetric int8 row by row as the copies
    /// round them: the nearest integer to `v · 127 / max |row|` (float32 arithmetic) times `max |row| / 127`.
    func int8Rounded(_ values: [Double], rows: Int) -> [Double] {
        let cols = values.count / rows
        var out = values
        for r in 0..<rows {
            let row = values[(r * cols)..<((r + 1) * cols)].map(Float.init)
            let largest = row.map(abs).max() ?? 0
            guard largest > 0 else { continue }
            let inverse = 127 / largest, scale = Double(largest / 127)
            for c in 0..<cols { out[r * cols + c] = Double((row[c] * inverse).rounded()) * scale }
        }
        return out
    }

    /// `values` (rows of activations) as the fast mode's products quantize them (cgraft_q8_quantize_rows): per block
    /// of 32, `d = max |block| / 127` and each value the nearest integer (ties to even) to `v / d`, times `d`.
    func q8Rounded(_ values: [Double]) -> [Double] {
        var out = values
        for start in stride(from: 0, to: values.count, by: 32) {
            let block = values[start..<(start + 32)].map(Float.init)
            let d = (block.map(abs).max() ?? 0) / 127, inverse: Float = d > 0 ? 1 / d : 0
            for j in 0..<32 { out[start + j] = Double((block[j] * inverse).rounded(.toNearestOrEven)) * Double(d) }
        }
        return out
    }

    /// The transpose of a row-major `[rows, count / rows]` matrix.
    func transposed(_ values: [Double], rows: Int) -> [Double] {
        let cols = values.count / rows
        return (0..<values.count).map { i in values[(i % rows) * cols + i / rows] }
    }

    /// Fast-mode decoding inside an ``Int8FactorCopies`` scope reads A (row by row) and B (column by column)
    /// rounded to int8, and A multiplies the input as the base product quantized it (int8 per block of 32): the
    /// fused update must match the definition computed from the rounded factors and input, and differ from the
    /// float32 one by no more than that rounding allows, for one and two rows; outside a scope the float32 factors
    /// and input are read.
    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func fastModeReadsInt8FactorsInsideAScope(type: GGMLType) throws {
        let (matrix, layer, lora) = try adaptedLayer(type, seed: 91, loraSeed: 5)
        let s = Double(lora.scaling)
        let exactA = lora.loraA.scalars.map(Double.init), exactB = lora.loraB.scalars.map(Double.init)
        let roundedA = int8Rounded(exactA, rows: rank)
        let roundedB = transposed(int8Rounded(transposed(exactB, rows: outF), rows: rank), rows: rank)
        #expect(zip(exactA, roundedA).contains { $0 != $1 }, "rounding to int8 changed nothing: the test would not tell")
        for rows in [1, 2] {
            let xv = randomValues(rows * inF, seed: UInt64(90 + rows))
            let x = Tensor(shape: [rows, inF], values: xv.map(Float.init))
            let (scoped, plain, baseOut, bytes) = withNoGrad {
                withInt8Activations {
                    let copies = Int8FactorCopies()
                    let scoped = withInt8FactorCopies(copies) { layer.forward(x) }
                    return (scoped, layer.forward(x), linear(x, frozen: matrix, nil), copies.bytes)
                }
            }
            // Values (B's in blocks of 16 output rows, the last one padded), and a scale per component.
            #expect(bytes == lora.loraA.count + (outF + 15) / 16 * 16 * rank + 4 * 2 * rank)
            func worstError(_ out: Tensor, a: [Double], b: [Double], x: [Double]? = nil) -> (Double, Double) {
                worstUpdateError(out, base: baseOut, x: x ?? xv, rows: rows, a: a, b: b, scale: s)
            }
            let (int8Error, scale) = worstError(scoped, a: roundedA, b: roundedB, x: q8Rounded(xv))
            let (int8VsExact, _) = worstError(scoped, a: exactA, b: exactB)
            let (plainError, _) = worstError(plain, a: exactA, b: exactB)
            print("LoRA fast decode \(type), \(rows) row(s): int8 factors max |error| \(int8Error) vs their definition, \(int8VsExact) vs float32's; outside a scope \(plainError); largest update \(scale)")
            #expect(scale > 0.1, "the update is too small to test")
            // The up projection rounds h (times B's scales) to int16, half a step of 1/32767 of its largest
            // component each: a few 1e-5 of the update at rank 16.
            #expect(int8Error <= 1e-4 * scale)
            #expect(plainError <= 1e-5 * scale)
            // Rounding to int8 moves each factor and input by at most half a step, 1/254 of its row's (its block's)
            // largest magnitude: the update by a few thousandths of its size.
            #expect(int8VsExact > 1e-4 * scale && int8VsExact <= 2e-2 * scale)
        }
    }

    /// A layer finds its int8 copies once per scope (by the scope's generation): the same buffers for every step
    /// inside one scope, fresh ones, made from the factors as they are then, in the next.
    @Test func int8CopiesAreFoundOncePerScope() throws {
        let layer = Linear(compact: try quantized(.q8_0, seed: 95), bias: nil)
        let lora = LoRALayer(base: layer, rank: rank, alpha: 32, useRSLoRA: false, dropout: 0, useDoRA: false,
                             initLoraWeights: false, bias: false, state: AdapterState(seed: 7))
        func found(_ scope: Int8FactorCopies) -> (values: UnsafePointer<Int8>, scale: Float)? {
            withInt8Activations {
                withInt8FactorCopies(scope) { lora.decodeInt8Factors.map { ($0.a.values, $0.a.scales[0]) } }
            }
        }
        let first = Int8FactorCopies(), second = Int8FactorCopies()
        withExtendedLifetime((first, second)) {
            let made = found(first), again = found(first)
            #expect(made != nil && made?.values == again?.values)
            // Component 0 of A doubled: its int8 scale doubles in a new scope; the open one keeps its copy.
            for j in 0..<inF { lora.loraA.pointer[j] *= 2 }
            let fresh = found(second), kept = found(first)
            #expect(fresh != nil && fresh?.values != made?.values)
            #expect(fresh?.scale == 2 * (made?.scale ?? 0) && kept?.scale == made?.scale)
            #expect(first.generation != second.generation)
        }
    }

    /// Inside one scope a layer keeps its decoding plan from token to token (``Int8FactorCopies/generation``):
    /// steps of one and two rows in any order must each add exactly their own update, in the exact mode against the
    /// float32 factors and in the fast mode against the int8-rounded ones and input.
    @Test(arguments: [false, true])
    func aScopeKeepsItsPlanAcrossSteps(fast: Bool) throws {
        let (matrix, layer, lora) = try adaptedLayer(seed: 97, loraSeed: 8)
        let exactA = lora.loraA.scalars.map(Double.init), exactB = lora.loraB.scalars.map(Double.init)
        let a = fast ? int8Rounded(exactA, rows: rank) : exactA
        let b = fast ? transposed(int8Rounded(transposed(exactB, rows: outF), rows: rank), rows: rank) : exactB
        let copies = Int8FactorCopies()
        for (step, rows) in [1, 2, 1, 2, 2, 1].enumerated() {
            let xv = randomValues(rows * inF, seed: UInt64(100 + step))
            let x = Tensor(shape: [rows, inF], values: xv.map(Float.init))
            let (out, baseOut) = withNoGrad {
                withInt8Activations(fast) {
                    (withInt8FactorCopies(copies) { layer.forward(x) }, linear(x, frozen: matrix, nil))
                }
            }
            let (worst, scale) = worstUpdateError(out, base: baseOut, x: fast ? q8Rounded(xv) : xv, rows: rows, a: a,
                                                  b: b, scale: Double(lora.scaling))
            #expect(scale > 0.1, "the update is too small to test")
            #expect(worst <= (fast ? 1e-4 : 1e-5) * scale, "step \(step), \(rows) row(s): max |error| \(worst)")
        }
    }

    /// A NaN in a factor reaches the fused fast-mode update as it reaches the float32 one: every output it enters is
    /// NaN, not a silently finite number.
    @Test func fastModeInt8FactorsPropagateNaN() throws {
        let (_, layer, lora) = try adaptedLayer(seed: 93, loraSeed: 6)
        lora.loraA.pointer[3 * inF + 7] = .nan
        let x = Tensor(shape: [1, inF], values: randomValues(inF, seed: 94).map(Float.init))
        let out = withNoGrad { withInt8Activations { withInt8FactorCopies(Int8FactorCopies()) { layer.forward(x) } } }
        let nans = out.scalars.filter(\.isNaN).count
        #expect(nans == outF, "\(nans) of \(outF) outputs are NaN")
    }
}
