import Foundation
import Testing
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// TR-PTS's token half on MiniLM: a reducing layer keeps [CLS] and the configured share of the best-attended
/// tokens (attention recomputed here by brute force), the fused token is the attention-weighted mean of the
/// others, and a classifier's logits do not depend on padding or packing; the row recombination passes a
/// finite-difference check against a Float64 reference.
@Suite struct TokenReductionTests {
    static let sequences: [[Int32]] = [
        [101, 7592, 2088, 2003, 1037, 2307, 2154, 2000, 2022, 102],
        [101, 2023, 2001, 102],
        [101, 1045, 2293, 2023, 3185, 2172, 999, 102],
        [101, 102],
    ]

    /// The sequences packed into one row, as training lays them out.
    static func packed() throws -> (TokenBatch, [Int32]) {
        var ids: [Int32] = [], positions: [Int32] = [], segments: [Int32] = [], first: [Int32] = []
        for (s, seq) in sequences.enumerated() {
            first.append(Int32(ids.count))
            ids += seq
            positions += (0..<seq.count).map(Int32.init)
            segments += [Int32](repeating: Int32(s), count: seq.count)
        }
        return (try TokenBatch(ids: ids, batchSize: 1, length: ids.count, positions: positions, segments: segments), first)
    }

    /// [CLS] attention of each token of `range` (heads averaged), in Float64 from the layer's queries and keys.
    static func bruteForceCLSAttention(_ q: Tensor, _ k: Tensor, range: Range<Int>, heads: Int) -> [Double] {
        let width = q.shape[2], d = width / heads
        var mean = [Double](repeating: 0, count: range.count)
        for h in 0..<heads {
            let logits = range.map { j in
                (0..<d).reduce(0.0) { $0 + Double(q.pointer[range.lowerBound * width + h * d + $1]) * Double(k.pointer[j * width + h * d + $1]) }
                    / Double(d).squareRoot()
            }
            let peak = logits.max() ?? 0
            let e = logits.map { Foundation.exp($0 - peak) }, total = e.reduce(0, +)
            for j in 0..<range.count { mean[j] += e[j] / total / Double(heads) }
        }
        return mean
    }

    @Test(arguments: TokenMergeMode.allCases)
    func reducingLayerKeepsTheRatioAndMergesByCLSAttention(mode: TokenMergeMode) throws {
        let bert = try Assets.loadMiniLM()
        let (batch, _) = try Self.packed()
        let layer = bert.layers[1]
        let reduction = TokenReduction(keepRatio: 0.5, layers: [1], mode: mode, isEnabled: { true })
        try withNoGrad {
            let x = try bert.embed(batch)
            let layout = TokenLayout(batch)
            let (out, after) = layer.forwardReducing(x, layout: layout, reduction: reduction)
            let (full, _) = layer.forwardReducing(x, layout: layout, reduction: nil)
            let q = layer.query.forward(x), k = layer.key.forward(x), v = layer.value.forward(x)
            // The post-attention states every token had before the reduction, computed here from the layer's parts.
            let context = scaledDotProductAttention(query: q, key: k, value: v, heads: bert.config.heads, kvHeads: bert.config.heads, mask: layout.mask)
            let h = layer.attentionNorm.forward(layer.attentionOutput.forward(context) + x)
            let width = bert.config.hiddenSize
            var start = 0
            for (s, seq) in Self.sequences.enumerated() {
                let n = seq.count, keep = Int((0.5 * Double(n - 1)).rounded(.up))
                let a = Self.bruteForceCLSAttention(q, k, range: start..<(start + n), heads: bert.config.heads)
                let kept = (1..<n).sorted { a[$0] != a[$1] ? a[$0] > a[$1] : $0 < $1 }.prefix(keep).sorted()
                let dropped = (1..<n).filter { !kept.contains($0) }
                let fused = mode == .merge && !dropped.isEmpty
                let placed = after.sequences[s]
                #expect(placed.count == 1 + keep + (fused ? 1 : 0), "sequence \(s): \(placed.count) tokens of \(n)")
                // Kept tokens: the unreduced layer's outputs (attention ran on every token; the rest is per token).
                for (slot, t) in ([0] + kept).enumerated() {
                    let got = Array(out.scalars[((placed.start + slot) * width)..<((placed.start + slot + 1) * width)])
                    let want = Array(full.scalars[((start + t) * width)..<((start + t + 1) * width)])
                    #expect(maxRelativeError(got.map(Double.init), want.map(Double.init)) < 1e-5, "sequence \(s) token \(t)")
                }
                if fused {
                    let total = dropped.reduce(0.0) { $0 + a[$1] }
                    let m = (0..<width).map { c in dropped.reduce(0.0) { $0 + a[$1] * Double(h.pointer[(start + $1) * width + c]) } / total }
                    let mt = Tensor(shape: [1, width], values: m.map(Float.init))
                    let want = layer.outputNorm.forward(layer.output.forward(gelu(layer.intermediate.forward(mt))) + mt)
                    let row = placed.start + placed.count - 1
                    let got = Array(out.scalars[(row * width)..<((row + 1) * width)])
                    #expect(maxRelativeError(got.map(Double.init), want.scalars.map(Double.init)) < 1e-4, "sequence \(s) fused token")
                }
                start += n
            }
            #expect(out.scalars.allSatisfy { $0.isFinite })
        }
    }

    /// Logits with reduction equal for the sequences padded, packed, and one at a time; they differ from the
    /// unreduced ones (the reduction does something) and are finite.
    @Test func classifierLogitsDoNotDependOnPaddingOrPacking() throws {
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 1)
        let padded = try TokenBatch(sequences: Self.sequences)
        let (packed, first) = try Self.packed()
        let plain = try withNoGrad { try classifier.forward(padded) }
        for mode in TokenMergeMode.allCases {
            bert.tokenReduction = TokenReduction(keepRatio: 0.4, layers: [1, 3], mode: mode, isEnabled: { true })
            let a = try withNoGrad { try classifier.forward(padded) }
            let b = try withNoGrad { try classifier.forward(packed, firstTokens: first) }
            let singles = try Self.sequences.map { s in try withNoGrad { try classifier.forward(try TokenBatch(sequences: [s])) } }
            let c = Tensor(shape: a.shape, values: singles.flatMap(\.scalars))
            #expect(maxAbsDifference(a, b) < 1e-5 && maxAbsDifference(a, c) < 1e-5, "\(mode): padded/packed/single differ")
            #expect(maxAbsDifference(a, plain) > 1e-4, "\(mode): reduction changed nothing")
            #expect(a.scalars.allSatisfy { $0.isFinite })
            let stats = bert.tokenReduction?.statistics
            #expect(stats.map { $0.layerTokensReduced < $0.layerTokensFull && $0.flopsReduced < $0.flopsFull } == true)
        }
        // Hidden states for every token never reduce.
        let hidden = try withNoGrad { try bert.forward(padded) }
        #expect(hidden.shape == [Self.sequences.count, padded.length, bert.config.hiddenSize])
        bert.tokenReduction = nil
        #expect(maxAbsDifference(try withNoGrad { try classifier.forward(padded) }, plain) == 0)
    }

    @Test func recombinedRowsMatchFiniteDifferences() {
        // 2 rows of 4 tokens (width 3) into 2 rows of 3: copies, a weighted fusion, padding.
        let starts = [0, 1, 2, 4, 5, 6, 6], sources: [Int32] = [0, 2, 1, 3, 4, 7], weights: [Float] = [1, 1, 0.25, 0.75, 1, 1]
        func reference(_ x: [[Double]]) -> [Double] {
            var out: [Double] = []
            for o in 0..<6 {
                for c in 0..<3 {
                    var acc = 0.0
                    for k in starts[o]..<starts[o + 1] { acc += Double(weights[k]) * x[0][Int(sources[k]) * 3 + c] }
                    out.append(acc)
                }
            }
            return out
        }
        GradientCheck().run("recombineRows", inputs: [randomValues(24, seed: 3)], shapes: [[2, 4, 3]], trainable: [true],
                            op: { recombineRows($0[0], outLength: 3, starts: starts, sources: sources, weights: weights) },
                            reference: reference)
    }
}
