import Testing
import CGraftKernels
import GraftTestSupport

/// The up projections of a decoding step's LoRA update. The fast mode's reads B's int8 columns in blocks of 16
/// output rows (`cgraft_int8_columns_blocked`): the copy holds each value where the kernel looks for it. Both it
/// and the float32 `cgraft_lora_up` (eight outputs reduced together) give every output the same value whichever
/// range computes it (whole groups, ranges that start or end inside one), equal to the definition.
@Suite struct LoRAUpKernelTests {
    /// B `[out, rank]`: 149 outputs end inside a block (9 blocks and 5 rows); rank 6 is no multiple of four.
    let out = 149, rank = 6

    /// B's int8 copy and scales, and h.
    func inputs() -> (b: [Float], values: [Int8], scales: [Float], h: [Float]) {
        let b = randomValues(out * rank, seed: 3, scale: 0.1).map(Float.init)
        var values = [Int8](repeating: 99, count: Int(cgraft_int8_blocked_count(Int64(out), Int64(rank))))
        var scales = [Float](repeating: 0, count: rank)
        cgraft_int8_columns_blocked(b, Int64(out), Int64(rank), &values, &scales)
        return (b, values, scales, randomValues(rank, seed: 4).map(Float.init))
    }

    @Test func theBlockedCopyHoldsEachRoundedValueWhereTheKernelReadsIt() {
        let (b, values, scales, _) = inputs()
        #expect(values.count == 160 * rank)
        for k in 0..<rank {
            let largest = (0..<out).map { abs(b[$0 * rank + k]) }.max() ?? 0
            #expect(scales[k] == largest / 127)
            for o in 0..<160 {
                let stored = values[o / 16 * 16 * rank + k * 16 + o % 16]
                // Rows past the end are zeros; the others the nearest integer to b · 127 / largest.
                let expected = o < out ? Int8((b[o * rank + k] * (127 / largest)).rounded()) : 0
                #expect(stored == expected, "output \(o), component \(k)")
            }
        }
    }

    /// `up(lower, upper, y)` (adding `0.75 ·` an update to outputs `lower ..< upper` of `y`) over all the outputs
    /// against `definition(o)` (the update's sum for output `o`), then over each split in `cuts` against that.
    func checkEveryRange(_ label: String, cuts: [[Int]], definition: (Int) -> Double,
                         up: (Int, Int, UnsafeMutablePointer<Float>) -> Void) {
        var whole = [Float](repeating: 0.5, count: out)
        whole.withUnsafeMutableBufferPointer { if let y = $0.baseAddress { up(0, out, y) } }
        for o in 0..<out {
            let expected = 0.5 + 0.75 * definition(o)
            let close = abs(Double(whole[o]) - expected) <= 1e-5 * max(1, abs(expected))
            #expect(whole[o].isFinite && close, "\(label): output \(o)")
        }
        for cut in cuts {
            var split = [Float](repeating: 0.5, count: out)
            split.withUnsafeMutableBufferPointer { buffer in
                guard let y = buffer.baseAddress else { return }
                for (lower, upper) in zip(cut, cut.dropFirst()) { up(lower, upper, y) }
            }
            #expect(zip(split, whole).allSatisfy { $0.bitPattern == $1.bitPattern }, "\(label): cuts \(cut)")
        }
    }

    @Test func everyRangeGivesEachOutputTheSameValue() {
        let (_, values, scales, h) = inputs()
        checkEveryRange("int8", cuts: [[0, 5, 21, 64, 70, 149], [0, 16, 32, 96, 148, 149], [0, 1, 2, 130, 149]],
                        definition: { o in
            (0..<rank).reduce(0.0) { sum, k in
                sum + Double(h[k] * scales[k]) * Double(values[o / 16 * 16 * rank + k * 16 + o % 16])
            }
        }, up: { lower, upper, y in
            cgraft_lora_up_int8(h, Int64(rank), values, scales, Int64(lower), Int64(upper), 0.75, y)
        })
    }

    @Test(arguments: [6, 16, 19])
    func theFloatKernelGivesEachOutputTheSameValueInEveryRange(rank: Int) {
        let b = randomValues(out * rank, seed: 7, scale: 0.1).map(Float.init)
        let h = randomValues(rank, seed: 8).map(Float.init)
        checkEveryRange("rank \(rank)", cuts: [[0, 5, 21, 64, 70, 149], [0, 8, 16, 96, 148, 149], [0, 1, 2, 130, 149]],
                        definition: { o in (0..<rank).reduce(0.0) { $0 + Double(b[o * rank + $1]) * Double(h[$1]) } },
                        up: { lower, upper, y in
                            cgraft_lora_up(h, Int64(rank), b, Int64(lower), Int64(upper), 0.75, y)
                        })
    }
}
