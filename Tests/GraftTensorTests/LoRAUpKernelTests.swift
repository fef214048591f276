import Testing
import CGraftKernels
import GraftTestSupport

/// The up projections of a decoding step's LoRA update. The fast mode's reads B's int8 columns in blocks of 16
/// output rows, components in pairs (`cgraft_int8_columns_blocked`): the copy holds each value where
/// `cgraft_int8_blocked_index` says, and the kernel sums h rounded to int16. Both it and the float32
/// `cgraft_lora_up` (eight outputs reduced together) give every output the same value whichever range computes it
/// (whole groups, ranges that start or end inside one), equal to the definition.
@Suite struct LoRAUpKernelTests {
    /// B `[out, rank]`: 149 outputs end inside a block (9 blocks and 5 rows); rank 6 is no multiple of four.
    let out = 149, rank = 6

    /// B's int8 copy and scales, and h, for rank `rank` (odd ranks pad the last pair with a zero component).
    func inputs(rank: Int = 6) -> (b: [Float], values: [Int8], scales: [Float], h: [Float]) {
        let b = randomValues(out * rank, seed: 3, scale: 0.1).map(Float.init)
        var values = [Int8](repeating: 99, count: Int(cgraft_int8_blocked_count(Int64(out), Int64(rank))))
        var scales = [Float](repeating: 0, count: rank)
        cgraft_int8_columns_blocked(b, Int64(out), Int64(rank), &values, &scales)
        return (b, values, scales, randomValues(rank, seed: 4).map(Float.init))
    }

    @Test func theBlockedCopyHoldsEachRoundedValueWhereTheKernelReadsIt() {
        let (b, values, scales, _) = inputs()
        #expect(values.count == 160 * rank)
        // Blocks of 16 rows, each [rank / 2][16][2]: row 17's components 2 and 3 sit side by side in block 1.
        #expect(cgraft_int8_blocked_index(17, 2, Int64(rank)) == 16 * 6 + 1 * 32 + 1 * 2)
        #expect(cgraft_int8_blocked_index(17, 3, Int64(rank)) == 16 * 6 + 1 * 32 + 1 * 2 + 1)
        for k in 0..<rank {
            let largest = (0..<out).map { abs(b[$0 * rank + k]) }.max() ?? 0
            #expect(scales[k] == largest / 127)
            for o in 0..<160 {
                let stored = values[Int(cgraft_int8_blocked_index(Int64(o), Int64(k), Int64(rank)))]
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

    @Test(arguments: [6, 7])
    func everyRangeGivesEachOutputTheSameValue(rank: Int) {
        let (_, values, scales, h) = inputs(rank: rank)
        // g = h ⊙ scales rounded to int16 with one scale d = max |g| / 32767.
        let g = (0..<rank).map { h[$0] * scales[$0] }
        let largest = g.map { abs($0) }.max() ?? 0, d = largest / 32767
        let rounded = g.map { ($0 * (32767 / largest)).rounded(.toNearestOrEven) }
        func stored(_ o: Int, _ k: Int) -> Double {
            Double(values[Int(cgraft_int8_blocked_index(Int64(o), Int64(k), Int64(rank)))])
        }
        let cuts = [[0, 5, 21, 64, 70, 149], [0, 16, 32, 96, 148, 149], [0, 1, 2, 130, 149]]
        checkEveryRange("int8 rank \(rank)", cuts: cuts, definition: { o in
            Double(d) * (0..<rank).reduce(0.0) { sum, k in sum + Double(rounded[k]) * stored(o, k) }
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
