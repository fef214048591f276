import Testing
import CGraftKernels
@testable import GraftTensor
import GraftTestSupport

/// bfloat16 products of frozen weights (issue 12, item 4): correct against float32 within what rounding both
/// operands to bfloat16 can move each output, forward and backward, on any CPU.
@Suite struct BFloat16LinearTests {
    /// bfloat16's unit roundoff: 8 significant bits.
    static let u: Double = 1.0 / 512

    @Test func roundingIsToNearestEvenAndKeepsSpecials() {
        let values: [Float] = [1, 1 + 1.0 / 256, 1 + 3.0 / 256, 1 + 1.0 / 512, 1 + 3.0 / 512, -2.5, .infinity, -.infinity, 0, -0.0, 3.0e38]
        // 1 + 2^-8 is exactly between 1 and 1 + 2^-7: ties go to the even 1; 1 + 3·2^-8 goes up to 1 + 2^-6.
        // (3e38 rounds to 0x7f62, 3.00405527e38, as Python computes it from the bit pattern.)
        let expected: [Float] = [1, 1, 1 + 1.0 / 64, 1, 1 + 1.0 / 128, -2.5, .infinity, -.infinity, 0, -0.0, 3.00405527e38]
        for count in [values.count, 40] {  // also through the 16-wide vector path
            let input = (0..<count).map { values[$0 % values.count] }
            var narrow = [UInt16](repeating: 0, count: count), wide = [Float](repeating: 0, count: count)
            cgraft_f32_to_bf16(input, &narrow, count)
            cgraft_bf16_to_f32(narrow, &wide, count)
            #expect(zip(wide, (0..<count).map { expected[$0 % values.count] }).allSatisfy { $0.0.bitPattern == $0.1.bitPattern })
        }
        var nan: UInt16 = 0
        var back: Float = 0
        cgraft_f32_to_bf16([Float.nan], &nan, 1)
        cgraft_bf16_to_f32([nan], &back, 1)
        #expect(back.isNaN)
    }

    @Test func forwardAndInputGradientAgreeWithFloat32WithinBFloat16Rounding() throws {
        guard ComputeDType.bfloat16.resolved == .bfloat16 else { return }  // oneDNN missing: bfloat16 falls back to float32
        var rng = GraftRNG(seed: 11)
        for (rows, inF, outF) in [(37, 64, 48), (256, 384, 1536), (5, 1536, 384)] {
            let x = Tensor.randomNormal([rows, inF], rng: &rng).requiringGrad()
            let w = Tensor.randomNormal([outF, inF], std: 0.05, rng: &rng)
            let bias = Tensor.randomNormal([outF], rng: &rng)
            let r = Tensor.randomNormal([rows, outF], rng: &rng)
            let y = linear(x, w, narrow: BFloat16Matrix(w), bias)
            sum(mul(y, r)).backward()
            let dx = try #require(x.grad)
            // float32 references and the rounding bound of each element: (2u + u²) Σ|a||b| over its dot product.
            var worstForward = 0.0, worstBackward = 0.0
            for i in 0..<rows {
                for o in 0..<outF {
                    var exact = Double(bias.pointer[o]), magnitude = 0.0
                    for k in 0..<inF {
                        let p = Double(x.pointer[i * inF + k]) * Double(w.pointer[o * inF + k])
                        exact += p
                        magnitude += abs(p)
                    }
                    let bound = (2 * Self.u + Self.u * Self.u) * magnitude + 1e-5
                    worstForward = worse(worstForward, abs(Double(y.pointer[i * outF + o]) - exact) / bound)
                    #expect(y.pointer[i * outF + o].isFinite)
                }
                for k in 0..<inF {
                    var exact = 0.0, magnitude = 0.0
                    for o in 0..<outF {
                        let p = Double(r.pointer[i * outF + o]) * Double(w.pointer[o * inF + k])
                        exact += p
                        magnitude += abs(p)
                    }
                    let bound = (2 * Self.u + Self.u * Self.u) * magnitude + 1e-5
                    worstBackward = worse(worstBackward, abs(Double(dx.pointer[i * inF + k]) - exact) / bound)
                    #expect(dx.pointer[i * inF + k].isFinite)
                }
            }
            print("bfloat16 linear \(rows)×\(inF)→\(outF): worst forward error \(worstForward) of its bound, backward \(worstBackward)")
            #expect(worstForward <= 1 && worstBackward <= 1)
            // And bfloat16 really rounds: the output is not the float32 one.
            let reference = withNoGrad { linear(x, w, bias) }
            #expect(zip(y.scalars, reference.scalars).contains { $0 != $1 })
        }
    }

    /// The LM head's chunked cross entropy with its products in bfloat16: the loss moves by at most twice the
    /// largest logit error rounding allows, and the input gradient stays within its products' bound.
    @Test func lmHeadCrossEntropyInBFloat16StaysWithinItsRoundingBound() throws {
        guard ComputeDType.bfloat16.resolved == .bfloat16 else { return }
        var rng = GraftRNG(seed: 5)
        let rows = 150, hidden = 64, vocab = 1000
        let w = Tensor.randomNormal([vocab, hidden], std: 0.1, rng: &rng)
        let targets = (0..<rows).map { i in i % 7 == 3 ? Int32(-100) : Int32((i * 37) % vocab) }
        let xExact = Tensor.randomNormal([rows, hidden], rng: &rng).requiringGrad()
        let xNarrow = Tensor(shape: xExact.shape, values: xExact.scalars).requiringGrad()
        let exact = linearCrossEntropy(xExact, weight: w, targets: targets, chunkRows: 64)
        let narrow = linearCrossEntropy(xNarrow, weight: w, narrow: BFloat16Matrix(w), targets: targets, chunkRows: 64)
        exact.backward()
        narrow.backward()
        // The largest logit error rounding allows: (2u + u²) max over rows and classes of Σ|x||w|.
        var worstMagnitude = 0.0
        for r in 0..<rows {
            for v in 0..<vocab {
                var m = 0.0
                for k in 0..<hidden { m += abs(Double(xExact.pointer[r * hidden + k]) * Double(w.pointer[v * hidden + k])) }
                worstMagnitude = max(worstMagnitude, m)
            }
        }
        let logitBound = (2 * Self.u + Self.u * Self.u) * worstMagnitude
        let lossError = abs(Double(narrow.item) - Double(exact.item))
        print("bfloat16 LM head: loss \(narrow.item) vs \(exact.item), error \(lossError) of bound \(2 * logitBound)")
        #expect(narrow.item.isFinite && lossError <= 2 * logitBound)
        let gExact = try #require(xExact.grad), gNarrow = try #require(xNarrow.grad)
        let gradError = worstOf(zip(gExact.scalars, gNarrow.scalars).map { abs($0 - $1) }, empty: .nan)
        let gradScale = worstOf(gExact.scalars.map(abs), empty: .nan)
        print("bfloat16 LM head: input gradient error \(gradError) (gradients up to \(gradScale))")
        #expect(gradError <= 0.05 * gradScale)
    }
}
