import Foundation
import Testing
import GraftTensor
import GraftTestSupport

/// Batched generation's attention: each row against its own cache (different lengths, an empty one, grouped-query
/// heads, a padded multi-token step), checked against a float64 causal softmax attention written out in full, and
/// each row's floats against that row run alone through scaledDotProductAttention (a sequence's tokens must not
/// depend on the batch it runs in).
@Suite struct RowCachedAttentionTests {
    @Test(arguments: [1, 3])
    func eachRowAttendsToItsOwnCache(queryLength t: Int) {
        Threading.setThreads(2)
        var rng = GraftRNG(seed: 11)
        let heads = 6, kvHeads = 2, headDim = 8, width = kvHeads * headDim
        // (positions before this step, positions this step adds): the cache then holds their sum.
        let shapes = [(0, 0), (0, t), (4, 1), (16, t)]
        let b = shapes.count
        let query = Tensor(shape: [b, t, heads * headDim], values: (0..<(b * t * heads * headDim)).map { _ in rng.nextNormal() })
        let caches: [[Float]] = shapes.map { before, added in (0..<((before + added) * width)).map { _ in rng.nextNormal() } }
        let values: [[Float]] = shapes.map { before, added in (0..<((before + added) * width)).map { _ in rng.nextNormal() } }
        // Each row's keys and values where a KV cache keeps them: blocks of their own (one float for an empty row).
        let keyBlocks = caches.map { copy($0) }, valueBlocks = values.map { copy($0) }
        defer { (keyBlocks + valueBlocks).forEach { $0.deallocate() } }
        let out = rowCachedAttention(query: query, rows: shapes.indices.map { r in
            CachedAttentionRow(keys: keyBlocks[r], values: valueBlocks[r], length: shapes[r].0 + shapes[r].1,
                               queryOffset: shapes[r].0)
        }, heads: heads, kvHeads: kvHeads)
        #expect(out.shape == [b, t, heads * headDim])
        for (r, (before, added)) in shapes.enumerated() {
            let length = before + added
            for i in 0..<t {
                for h in 0..<heads {
                    let kvh = h / (heads / kvHeads)
                    let q = query.pointer + (r * t + i) * heads * headDim + h * headDim
                    // Query i sits at position before + i and sees keys 0 ... before + i.
                    let visible = min(length, before + i + 1)
                    var scores = (0..<visible).map { j -> Double in
                        var s = 0.0
                        for d in 0..<headDim { s += Double(q[d]) * Double(caches[r][j * width + kvh * headDim + d]) }
                        return s / Double(headDim).squareRoot()
                    }
                    let top = scores.max() ?? 0
                    scores = scores.map { exp($0 - top) }
                    let total = scores.reduce(0, +)
                    for d in 0..<headDim {
                        var expected = 0.0
                        for j in 0..<visible { expected += scores[j] / total * Double(values[r][j * width + kvh * headDim + d]) }
                        let got = out.pointer[(r * t + i) * heads * headDim + h * headDim + d]
                        #expect(got.isFinite && abs(Double(got) - expected) <= 1e-5,
                                "row \(r) query \(i) head \(h) dim \(d): \(got) vs \(expected)")
                    }
                }
            }
            guard length > 0 else { continue }
            let alone = scaledDotProductAttention(
                query: query.rowsView(r..<(r + 1)),
                key: Tensor(shape: [1, length, width], values: caches[r]),
                value: Tensor(shape: [1, length, width], values: values[r]),
                heads: heads, kvHeads: kvHeads, mask: AttentionMask(causal: true, queryOffset: before))
            let n = t * heads * headDim
            #expect((0..<n).allSatisfy { alone.pointer[$0] == out.pointer[r * n + $0] }, "row \(r) differs from its run alone")
        }
    }
}

/// `values` in a block of its own (at least one float), which the caller deallocates.
private func copy(_ values: [Float]) -> UnsafeMutablePointer<Float> {
    let block = UnsafeMutablePointer<Float>.allocate(capacity: max(values.count, 1))
    block.initialize(repeating: 0, count: max(values.count, 1))
    block.update(from: values, count: values.count)
    return block
}
