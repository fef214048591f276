/// One batch row's keys and values for ``rowCachedAttention(query:rows:heads:kvHeads:)``: its own cache, read in place.
public struct CachedAttentionRow {
    /// Keys `[length, kvHeads · headDim]`, row-major.
    public var keys: UnsafePointer<Float>
    /// Values, laid out as `keys`.
    public var values: UnsafePointer<Float>
    /// Positions stored (the row's queries included); 0 = the row has no keys and its output stays zero.
    public var length: Int
    /// Key position of the row's first query (the cache length before this step).
    public var queryOffset: Int

    /// Describes one row's cache.
    public init(keys: UnsafePointer<Float>, values: UnsafePointer<Float>, length: Int, queryOffset: Int) {
        self.keys = keys
        self.values = values
        self.length = length
        self.queryOffset = queryOffset
    }
}

/// Causal attention of each batch row's queries against that row's own cached keys and values (batched
/// generation: every sequence has its own cache), `[batch, queryLength, heads · headDim]` → the same shape.
///
/// All rows and heads run as one parallel loop. Each (row, head) computes exactly what
/// ``scaledDotProductAttention(query:key:value:heads:kvHeads:mask:)`` computes for that row alone with
/// `AttentionMask(causal: true, queryOffset:)`, with the same products, so a sequence gets the same values in a
/// batch as alone. Inference only (records no gradient).
public func rowCachedAttention(query: Tensor, rows: [CachedAttentionRow], heads: Int, kvHeads: Int) -> Tensor {
    let batch = query.shape[0], tq = query.shape[1]
    let headDim = query.shape[2] / heads
    let group = heads / kvHeads
    let qStride = heads * headDim, kStride = kvHeads * headDim
    let scale = 1 / Float(headDim).squareRoot()
    let out = Tensor(zeros: query.shape)
    guard batch == rows.count, heads % kvHeads == 0 else { return out }

    // Each (row, head) writes its own probabilities and output columns.
    var probOffsets: [Int] = []
    probOffsets.reserveCapacity(batch)
    var probCount = 0
    for row in rows {
        probOffsets.append(probCount)
        probCount += tq * row.length * heads
    }
    let probs = TensorBuffer(count: max(probCount, 1), zeroed: false)
    let pq = query.pointer, po = out.pointer, pp = probs.pointer
    parallelFor(batch * heads, grain: max(1, heads / 2)) { range in
        for task in range {
            let b = task / heads, h = task % heads
            let row = rows[b], kn = row.length
            guard kn > 0 else { continue }
            let kvh = h / group
            let qbh = pq + b * tq * qStride + h * headDim
            let pbh = pp + probOffsets[b] + h * tq * kn
            sgemm(transA: false, transB: true, m: tq, n: kn, k: headDim, alpha: scale,
                  a: qbh, lda: qStride, b: row.keys + kvh * headDim, ldb: kStride, c: pbh, ldc: kn, parallel: false)
            for i in 0..<tq {
                let p = pbh + i * kn
                let visible = min(kn, row.queryOffset + i + 1)
                for j in visible..<kn { p[j] = -.infinity }
                softmaxRow(p, kn)
            }
            sgemm(transA: false, transB: false, m: tq, n: headDim, k: kn,
                  a: pbh, lda: kn, b: row.values + kvh * headDim, ldb: kStride,
                  c: po + b * tq * qStride + h * headDim, ldc: qStride, parallel: false)
        }
    }
    return withExtendedLifetime(probs) { out }
}
