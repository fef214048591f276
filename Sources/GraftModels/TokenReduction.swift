import Foundation
import GraftTensor

/// What becomes of the tokens a ``TokenReduction`` does not keep.
public enum TokenMergeMode: String, Sendable, CaseIterable {
    /// They are fused into one token: their mean weighted by the [CLS] attention each received.
    case merge
    /// They are left out.
    case drop
}

/// Task-relevant token selection (TR-PTS, Luo et al., 2025) in a BERT encoder: in each layer listed in
/// ``layers``, after self-attention (before the feed-forward block), every sequence keeps its first token ([CLS])
/// and the `⌈keepRatio · (n − 1)⌉` other tokens that received the most attention from [CLS] (averaged over the
/// heads, ties to the earlier token), in their order; the rest are dropped or, with ``TokenMergeMode/merge``,
/// fused into one token appended to the sequence, `Σ aⱼ hⱼ / Σ aⱼ` over the uninformative tokens `j` with their
/// [CLS] attention `aⱼ`. Later layers see the shorter sequences, so attention and the feed-forward blocks do less
/// work. The selection and the fusion weights are taken as constants (no gradient flows through the choice);
/// gradients flow through the kept and fused hidden states.
///
/// Padding and packing stay correct: only a sequence's real tokens take part, each sequence is reduced on its
/// own, and the reduced sequences are laid out again with their own attention mask. It runs only where the [CLS]
/// output alone is used (``BertForSequenceClassification``); ``BertModel/forward(_:)`` returns every token's
/// state and never reduces. It is for bidirectional encoders only: a causal decoder needs every position to
/// generate, so the TR-PTS adapter refuses it there.
public final class TokenReduction: @unchecked Sendable {
    /// Fraction of each sequence's non-[CLS] tokens kept at every reducing layer, in (0, 1].
    public let keepRatio: Double
    /// The encoder layers (0-based) that reduce.
    public let layers: Set<Int>
    /// Whether the uninformative tokens are fused or dropped.
    public let mode: TokenMergeMode
    /// Whether the next forward pass reduces (the owning adapter is active).
    public let isEnabled: @Sendable () -> Bool
    /// Token and FLOP counts of the passes since the last ``resetStatistics()``.
    public private(set) var statistics = TokenReductionStatistics()

    /// A reduction keeping `keepRatio` of the tokens at `layers`.
    public init(keepRatio: Double, layers: Set<Int>, mode: TokenMergeMode, isEnabled: @escaping @Sendable () -> Bool) {
        self.keepRatio = keepRatio
        self.layers = layers
        self.mode = mode
        self.isEnabled = isEnabled
    }

    /// Non-[CLS] tokens kept of a sequence of `n` tokens (n ≥ 1).
    public func keptCount(sequenceLength n: Int) -> Int {
        // The tolerance keeps a product such as 0.7 · 10 = 7.000000000000001 from rounding up to 8.
        max(0, min(n - 1, Int((keepRatio * Double(n - 1) - 1e-9).rounded(.up))))
    }

    /// Forgets the counts.
    public func resetStatistics() { statistics = TokenReductionStatistics() }

    func record(_ pass: TokenReductionStatistics) { statistics.add(pass) }
}

/// Tokens and multiply-add FLOPs of the encoder layers with and without reduction.
public struct TokenReductionStatistics: Sendable, Equatable {
    /// Forward passes counted.
    public var passes = 0
    /// Sequences counted.
    public var sequences = 0
    /// Σ over layers and sequences of the tokens entering each layer, unreduced.
    public var layerTokensFull = 0
    /// The same with reduction.
    public var layerTokensReduced = 0
    /// Encoder FLOPs unreduced (2 per multiply-add: projections, attention, feed-forward).
    public var flopsFull = 0.0
    /// Encoder FLOPs with reduction.
    public var flopsReduced = 0.0

    mutating func add(_ o: TokenReductionStatistics) {
        passes += o.passes
        sequences += o.sequences
        layerTokensFull += o.layerTokensFull
        layerTokensReduced += o.layerTokensReduced
        flopsFull += o.flopsFull
        flopsReduced += o.flopsReduced
    }

    /// FLOPs of one BERT layer over a sequence whose attention sees `n` tokens and whose feed-forward block
    /// sees `m` (`d` hidden, `f` intermediate).
    static func layerFlops(attention n: Int, feedForward m: Int, hidden d: Int, intermediate f: Int) -> Double {
        let n = Double(n), m = Double(m), d = Double(d), f = Double(f)
        return 2 * n * 3 * d * d + 4 * n * n * d + 2 * m * d * d + 4 * m * d * f
    }
}

/// Where each sequence's tokens sit in a `[rows, length, hidden]` activation: contiguous in its row.
struct TokenLayout {
    struct Sequence {
        var row: Int, start: Int, count: Int
        /// Flat index of the sequence's first token in the batch as given.
        var origin: Int
    }
    var rows: Int, length: Int
    var sequences: [Sequence]
    /// Packed rows (several sequences per row) keep segment ids.
    var packed: Bool

    /// The layout of `batch`: one sequence per row, or the runs of equal segment ids of a packed row.
    init(_ batch: TokenBatch) {
        rows = batch.batchSize
        length = batch.length
        packed = batch.segments != nil
        sequences = []
        for b in 0..<rows {
            let real = batch.lengths[b]
            guard let segs = batch.segments else {
                sequences.append(Sequence(row: b, start: 0, count: real, origin: b * length))
                continue
            }
            var start = 0
            while start < real {
                var end = start + 1
                while end < real && segs[b * length + end] == segs[b * length + start] { end += 1 }
                sequences.append(Sequence(row: b, start: start, count: end - start, origin: b * length + start))
                start = end
            }
        }
    }

    init(rows: Int, length: Int, sequences: [Sequence], packed: Bool) {
        self.rows = rows
        self.length = length
        self.sequences = sequences
        self.packed = packed
    }

    /// The attention mask: real tokens per row, and with packing one segment per sequence (−1 on padding).
    var mask: AttentionMask {
        var keyLengths = [Int](repeating: 0, count: rows)
        for s in sequences { keyLengths[s.row] = max(keyLengths[s.row], s.start + s.count) }
        guard packed else { return AttentionMask(keyLengths: keyLengths) }
        var segments = [Int32](repeating: -1, count: rows * length)
        for (i, s) in sequences.enumerated() {
            for t in s.start..<(s.start + s.count) { segments[s.row * length + t] = Int32(i) }
        }
        return AttentionMask(keyLengths: keyLengths, segments: segments)
    }

    /// Each pooled token's flat index after reduction, given its index in the batch as given (a sequence's first
    /// token); throws for an index that starts no sequence.
    func remap(_ tokens: [Int32]) throws -> [Int32] {
        var byOrigin: [Int: Int] = [:]
        for s in sequences { byOrigin[s.origin] = s.row * length + s.start }
        return try tokens.map { t in
            guard let n = byOrigin[Int(t)] else {
                throw GraftError.invalid("token reduction pools each sequence's first token; token \(t) starts no sequence of the batch")
            }
            return Int32(n)
        }
    }
}

/// The rows of `x` (`[rows, length, width]`) recombined: output row `o` (of `rows · outLength`) is
/// `Σ weights[k] · x[sources[k]]` over `k` in `starts[o]..<starts[o + 1]` (flat row indices); no sources gives a
/// zero row. Every input row feeds at most one output row. Recorded for autograd (∂x[sources[k]] += weights[k] ·
/// ∂out[o]).
func recombineRows(_ x: Tensor, outLength: Int, starts: [Int], sources: [Int32], weights: [Float]) -> Tensor {
    let rows = x.shape[0], width = x.shape[2]
    let out = Tensor(zeros: [rows, outLength, width])
    let outRows = rows * outLength
    let px = x.pointer, po = out.pointer
    starts.withUnsafeBufferPointer { st in
        sources.withUnsafeBufferPointer { src in
            weights.withUnsafeBufferPointer { w in
                parallelFor(outRows, grain: max(1, 4096 / max(width, 1))) { range in
                    for o in range {
                        for k in st[o]..<st[o + 1] { axpyRow(po + o * width, px + Int(src[k]) * width, w[k], width) }
                    }
                }
            }
        }
    }
    let shape = x.shape
    return Tensor.result(out, inputs: [x]) { g in
        let d = Tensor(zeros: shape)
        let pd = d.pointer, pg = g.pointer
        starts.withUnsafeBufferPointer { st in
            sources.withUnsafeBufferPointer { src in
                weights.withUnsafeBufferPointer { w in
                    parallelFor(outRows, grain: max(1, 4096 / max(width, 1))) { range in
                        for o in range {
                            for k in st[o]..<st[o + 1] { axpyRow(pd + Int(src[k]) * width, pg + o * width, w[k], width) }
                        }
                    }
                }
            }
        }
        return [d]
    }
}

/// `y += a · x` over `n` floats, eight lanes at a time.
@inline(__always)
private func axpyRow(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ a: Float, _ n: Int) {
    var i = 0
    let av = SIMD8<Float>(repeating: a)
    while i + 8 <= n {
        let yv = UnsafeRawPointer(y + i).loadUnaligned(as: SIMD8<Float>.self)
        let xv = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
        UnsafeMutableRawPointer(y + i).storeBytes(of: yv + av * xv, as: SIMD8<Float>.self)
        i += 8
    }
    while i < n {
        y[i] += a * x[i]
        i += 1
    }
}

extension TokenReduction {
    /// Each sequence's mean [CLS] attention over its tokens (heads averaged), from the layer's queries and keys
    /// (`[rows, length, heads · headDim]`), untracked.
    func clsAttention(query q: Tensor, key k: Tensor, layout: TokenLayout, heads: Int) -> [[Float]] {
        let width = q.shape[2], headDim = width / heads, length = layout.length
        let scale = 1 / Float(headDim).squareRoot()
        let pq = q.pointer, pk = k.pointer
        var result = [[Float]](repeating: [], count: layout.sequences.count)
        for (i, s) in layout.sequences.enumerated() where s.count > 0 {
            var mean = [Float](repeating: 0, count: s.count)
            var logits = [Float](repeating: 0, count: s.count)
            let cls = pq + (s.row * length + s.start) * width
            for h in 0..<heads {
                var peak = -Float.infinity
                for j in 0..<s.count {
                    let key = pk + (s.row * length + s.start + j) * width + h * headDim
                    var dot: Float = 0
                    for c in 0..<headDim { dot += cls[h * headDim + c] * key[c] }
                    logits[j] = dot * scale
                    peak = max(peak, logits[j])
                }
                var total: Float = 0
                for j in 0..<s.count {
                    logits[j] = expf(logits[j] - peak)
                    total += logits[j]
                }
                for j in 0..<s.count { mean[j] += logits[j] / (total * Float(heads)) }
            }
            result[i] = mean
        }
        return result
    }

    /// The recombination that keeps, per sequence, [CLS] and its best-attended tokens (plus the fused token), and
    /// the layout after it.
    func plan(_ layout: TokenLayout, scores: [[Float]]) -> (starts: [Int], sources: [Int32], weights: [Float], layout: TokenLayout) {
        var perRow = [[(sources: [Int32], weights: [Float])]](repeating: [], count: layout.rows)
        var reduced: [TokenLayout.Sequence] = []
        var used = [Int](repeating: 0, count: layout.rows)
        for (i, s) in layout.sequences.enumerated() {
            let flat = { (t: Int) in Int32(s.row * layout.length + s.start + t) }
            var tokens: [(sources: [Int32], weights: [Float])] = []
            if s.count > 0 {
                let a = scores[i]
                let keep = keptCount(sequenceLength: s.count)
                let order = (1..<s.count).sorted { a[$0] != a[$1] ? a[$0] > a[$1] : $0 < $1 }
                let kept = order.prefix(keep).sorted(), dropped = order.dropFirst(keep).sorted()
                tokens.append(([flat(0)], [1]))
                for t in kept { tokens.append(([flat(t)], [1])) }
                if mode == .merge, !dropped.isEmpty {
                    let total = dropped.reduce(Float(0)) { $0 + a[$1] }
                    let weights = total > 0 && total.isFinite ? dropped.map { a[$0] / total }
                        : [Float](repeating: 1 / Float(dropped.count), count: dropped.count)
                    tokens.append((dropped.map(flat), weights))
                }
            }
            reduced.append(.init(row: s.row, start: used[s.row], count: tokens.count, origin: s.origin))
            used[s.row] += tokens.count
            perRow[s.row] += tokens
        }
        let outLength = max(1, used.max() ?? 1)
        var starts = [0], sources: [Int32] = [], weights: [Float] = []
        for b in 0..<layout.rows {
            for t in 0..<outLength {
                if t < perRow[b].count {
                    sources += perRow[b][t].sources
                    weights += perRow[b][t].weights
                }
                starts.append(sources.count)
            }
        }
        return (starts, sources, weights, TokenLayout(rows: layout.rows, length: outLength, sequences: reduced, packed: layout.packed))
    }
}

extension BertLayer {
    /// ``forward(_:mask:prefix:)`` over `layout`, reducing the tokens after attention when `reduction` is given.
    func forwardReducing(_ x: Tensor, layout: TokenLayout, reduction: TokenReduction?) -> (Tensor, TokenLayout) {
        let mask = layout.mask
        let q = query.forward(x), k = key.forward(x), v = value.forward(x)
        let context = scaledDotProductAttention(query: q, key: k, value: v, heads: heads, kvHeads: heads, mask: mask)
        let attended = applyLayerAdapters(layerAdapters, site: .attention, output: attentionOutput.forward(context), input: x, mask: mask)
        var h = attentionNorm.forward(attended + x), input = x, after = layout
        if let reduction {
            let scores = withNoGrad { reduction.clsAttention(query: q, key: k, layout: layout, heads: heads) }
            let p = reduction.plan(layout, scores: scores)
            h = recombineRows(h, outLength: p.layout.length, starts: p.starts, sources: p.sources, weights: p.weights)
            if !layerAdapters.isEmpty {
                input = recombineRows(x, outLength: p.layout.length, starts: p.starts, sources: p.sources, weights: p.weights)
            }
            after = p.layout
        }
        let reducedMask = reduction == nil ? mask : after.mask
        let ff = applyLayerAdapters(layerAdapters, site: .feedForward, output: output.forward(gelu(intermediate.forward(h))), input: h, mask: reducedMask)
        return (applyLayerAdapters(layerAdapters, site: .output, output: outputNorm.forward(ff + h), input: input, mask: reducedMask), after)
    }
}

extension BertModel {
    /// The last hidden state with ``tokenReduction`` applied, `[batch, reduced length, hidden]`, and each
    /// sequence's first token's flat index in it for the batch's `firstTokens` (nil: position 0 of every row).
    func forwardReducingTokens(_ batch: TokenBatch, firstTokens: [Int32]?, reduction: TokenReduction) throws -> (Tensor, [Int32]) {
        try batch.validate(vocabularySize: config.vocabSize)
        try runForwardHooks(batch, cache: nil)
        guard promptAdapters.first(where: { $0.isEnabled }) == nil, prefixAdapters.first(where: { $0.isEnabled }) == nil else {
            throw GraftError(.unsupported, "token reduction (TR-PTS) cannot run with prompt or prefix tuning adapters enabled")
        }
        var x = try embed(batch)
        var layout = TokenLayout(batch)
        var pass = TokenReductionStatistics(passes: 1, sequences: layout.sequences.count)
        let d = config.hiddenSize, f = config.intermediateSize
        let full = layout.sequences.map(\.count)
        for (i, layer) in layers.enumerated() {
            let reducing = reduction.layers.contains(i)
            let before = layout.sequences.map(\.count)
            (x, layout) = layer.forwardReducing(x, layout: layout, reduction: reducing ? reduction : nil)
            for (s, n) in before.enumerated() {
                pass.layerTokensReduced += n
                pass.layerTokensFull += full[s]
                pass.flopsReduced += TokenReductionStatistics.layerFlops(attention: n, feedForward: layout.sequences[s].count, hidden: d, intermediate: f)
                pass.flopsFull += TokenReductionStatistics.layerFlops(attention: full[s], feedForward: full[s], hidden: d, intermediate: f)
            }
        }
        reduction.record(pass)
        let picks = firstTokens ?? (0..<batch.batchSize).map { Int32($0 * batch.length) }
        return (x, try layout.remap(picks))
    }
}
