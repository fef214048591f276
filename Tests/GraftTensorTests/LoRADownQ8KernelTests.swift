import Testing
import CGraftKernels
import GraftTestSupport

/// The fast mode's LoRA down projection against the base product's int8 activations (`cgraft_lora_down_q8`): each
/// component equals the definition `scales[k] · Σ_b d[b] · Σ_j a[k, j] · q[j]`, bit for bit the portable loop's value
/// (the vector path adds the same lanes in the same order), whichever components a call covers.
@Suite struct LoRADownQ8KernelTests {
    /// 7 components (a group of four and three more), 5 blocks of 32.
    let rank = 7, inF = 160

    func inputs() -> (q: [Int8], d: [Float], a: [Int8], scales: [Float]) {
        let x = randomValues(inF, seed: 11).map(Float.init)
        var q = [Int8](repeating: 0, count: inF), d = [Float](repeating: 0, count: inF / 32)
        var sums = [Float](repeating: 0, count: inF / 32)
        cgraft_q8_quantize_rows(x, Int64(inF), 1, Int64(inF), &q, &d, &sums)
        let af = randomValues(rank * inF, seed: 12, scale: 0.05).map(Float.init)
        var a = [Int8](repeating: 0, count: rank * inF), scales = [Float](repeating: 0, count: rank)
        cgraft_int8_rows(af, Int64(rank), Int64(inF), &a, &scales)
        // The extremes the integer sums must hold: ±127 in both operands.
        a[3] = 127
        q[3] = -127
        a[4] = -127
        q[4] = -127
        return (q, d, a, scales)
    }

    @Test func everyComponentIsTheDefinitionAndThePortableLoopsBits() {
        let (q, d, a, scales) = inputs()
        var h = [Float](repeating: .nan, count: rank)
        cgraft_lora_down_q8(q, d, Int64(inF), a, scales, Int64(rank), &h)
        for k in 0..<rank {
            var expected = 0.0
            for b in 0..<(inF / 32) {
                var s = 0
                for j in (b * 32)..<((b + 1) * 32) { s += Int(a[k * inF + j]) * Int(q[j]) }
                expected += Double(d[b]) * Double(s)
            }
            expected *= Double(scales[k])
            #expect(h[k].isFinite && abs(Double(h[k]) - expected) <= 1e-5 * max(1, abs(expected)), "component \(k)")
            let row = Array(a[(k * inF)..<((k + 1) * inF)])
            let portable = scales[k] * cgraft_lora_down_q8_portable_dot(q, d, Int64(inF), row)
            #expect(h[k].bitPattern == portable.bitPattern, "component \(k): \(h[k]) vs portable \(portable)")
        }
        // Components in parts (two, then five) give the same bits as all at once.
        var parts = [Float](repeating: .nan, count: rank)
        a.withUnsafeBufferPointer { av in
            scales.withUnsafeBufferPointer { sv in
                parts.withUnsafeMutableBufferPointer { hv in
                    guard let ap = av.baseAddress, let sp = sv.baseAddress, let hp = hv.baseAddress else { return }
                    cgraft_lora_down_q8(q, d, Int64(inF), ap, sp, 2, hp)
                    cgraft_lora_down_q8(q, d, Int64(inF), ap + 2 * inF, sp + 2, Int64(rank - 2), hp + 2)
                }
            }
        }
        #expect(zip(parts, h).allSatisfy { $0.bitPattern == $1.bitPattern })
    }

    /// A NaN scale (a factor row that held a non-finite value) makes its component NaN; a width that is not whole
    /// blocks writes nothing.
    @Test func aNonFiniteRowGivesNaNAndPartialBlocksAreRefused() {
        let (q, d, a, scalesIn) = inputs()
        var scales = scalesIn
        scales[5] = .nan
        var h = [Float](repeating: 0, count: rank)
        cgraft_lora_down_q8(q, d, Int64(inF), a, scales, Int64(rank), &h)
        #expect(h[5].isNaN && h.enumerated().allSatisfy { $0.offset == 5 || $0.element.isFinite })
        var untouched = [Float](repeating: 2, count: rank)
        cgraft_lora_down_q8(q, d, 100, a, scales, Int64(rank), &untouched)
        #expect(untouched.allSatisfy { $0 == 2 })
    }
}
