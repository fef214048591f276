import CGraftSystem

/// Which key positions each query may attend to in ``scaledDotProductAttention(query:key:value:heads:kvHeads:mask:)``.
public struct AttentionMask: Sendable {
    /// Queries see only keys at or before their own position (decoders).
    public var causal: Bool
    /// Per batch row, how many leading key positions are real (the rest is padding); nil = all.
    public var keyLengths: [Int]?
    /// Packed sequences: one id per token (`[batch * length]`, self-attention only). Each contiguous run of
    /// equal ids is attended as its own sequence, so packed sequences never see each other and no work is
    /// spent on the blocks between them.
    public var segments: [Int32]?
    /// Key position of the first query (the KV-cache length during generation).
    public var queryOffset: Int

    /// Creates a mask.
    public init(causal: Bool = false, keyLengths: [Int]? = nil, segments: [Int32]? = nil, queryOffset: Int = 0) {
        self.causal = causal
        self.keyLengths = keyLengths
        self.segments = segments
        self.queryOffset = queryOffset
    }
}

/// One block of attention work: queries `q0..<q0+qn` of batch row `b` against keys `k0..<k0+kn`.
private struct AttentionBlock {
    var b: Int, q0: Int, qn: Int, k0: Int, kn: Int
    /// Offset of this block's probabilities (per head: `qn * kn`) in the saved buffer.
    var probOffset: Int
}

/// Multi-head scaled dot-product attention, `softmax(Q Kᵀ / √d + mask) V`, with grouped-query heads.
///
/// - `query`: `[batch, queryLength, heads * headDim]`
/// - `key`, `value`: `[batch, keyLength, kvHeads * headDim]`
/// - result: `[batch, queryLength, heads * headDim]`
///
/// Heads are read in place with leading-dimension strides (no transposes or copies). Query head `h` uses
/// key/value head `h / (heads / kvHeads)`. Packed segments are computed block by block. A query whose keys are
/// all masked outputs zeros.
public func scaledDotProductAttention(
    query: Tensor, key: Tensor, value: Tensor, heads: Int, kvHeads: Int, mask: AttentionMask
) -> Tensor {
    precondition(query.rank == 3 && key.rank == 3 && value.rank == 3, "attention: rank-3 inputs expected")
    let batch = query.shape[0], tq = query.shape[1], tk = key.shape[1]
    let headDim = query.shape[2] / heads
    precondition(heads % kvHeads == 0 && key.shape[2] == kvHeads * headDim && value.shape == key.shape,
                 "attention: q \(query.shape) k \(key.shape) v \(value.shape) heads \(heads)/\(kvHeads)")
    let group = heads / kvHeads
    let qStride = heads * headDim, kStride = kvHeads * headDim
    let scale = 1 / Float(headDim).squareRoot()

    var blocks: [AttentionBlock] = []
    var probCount = 0
    for b in 0..<batch {
        let klen = min(tk, mask.keyLengths?[b] ?? tk)
        if let segs = mask.segments, tq == tk {
            var start = 0
            while start < tq {
                var end = start + 1
                while end < tq && segs[b * tq + end] == segs[b * tq + start] { end += 1 }
                let kn = max(0, min(end, klen) - start)
                blocks.append(AttentionBlock(b: b, q0: start, qn: end - start, k0: start, kn: kn, probOffset: probCount))
                probCount += (end - start) * kn * heads
                start = end
            }
        } else {
            blocks.append(AttentionBlock(b: b, q0: 0, qn: tq, k0: 0, kn: klen, probOffset: probCount))
            probCount += tq * klen * heads
        }
    }

    // Every block's probabilities are written by its first product; rows of empty blocks stay zero in `out`.
    let probs = Tensor(uninitialized: [probCount])
    let out = Tensor(zeros: query.shape)
    let pq = query.pointer, pk = key.pointer, pv = value.pointer, pp = probs.pointer, po = out.pointer
    let causal = mask.causal, offset = mask.queryOffset

    // One task per (block, head); each writes its own probabilities and output columns. A chunk gets about 64K
    // multiply-adds at least, so one decoding query over a cache of a hundred keys already splits its heads.
    let work = blocks.filter { $0.kn > 0 }
    let taskMultiplyAdds = 2 * headDim * max(1, (tq * tk) / max(blocks.count, 1))
    parallelFor(work.count * heads, grain: max(1, 65536 / taskMultiplyAdds)) { range in
        for task in range {
            let block = work[task / heads], h = task % heads
            let kvh = h / group
            let qbh = pq + (block.b * tq + block.q0) * qStride + h * headDim
            let kbh = pk + (block.b * tk + block.k0) * kStride + kvh * headDim
            let vbh = pv + (block.b * tk + block.k0) * kStride + kvh * headDim
            let pbh = pp + block.probOffset + h * block.qn * block.kn
            sgemm(transA: false, transB: true, m: block.qn, n: block.kn, k: headDim, alpha: scale,
                  a: qbh, lda: qStride, b: kbh, ldb: kStride, c: pbh, ldc: block.kn, parallel: false)
            for i in 0..<block.qn {
                let row = pbh + i * block.kn
                if causal {
                    // Query i of the block sits at key position offset + i (positions are block-relative).
                    let visible = min(block.kn, offset + i + 1)
                    for j in visible..<block.kn { row[j] = -.infinity }
                }
                softmaxRow(row, block.kn)
            }
            sgemm(transA: false, transB: false, m: block.qn, n: headDim, k: block.kn,
                  a: pbh, lda: block.kn, b: vbh, ldb: kStride,
                  c: po + (block.b * tq + block.q0) * qStride + h * headDim, ldc: qStride, parallel: false)
        }
    }

    return Tensor.result(out, inputs: [query, key, value]) { g in
        let pq = query.pointer, pk = key.pointer, pv = value.pointer, pp = probs.pointer, pg = g.pointer
        let dq: Tensor? = query.requiresGrad ? Tensor(zeros: query.shape) : nil
        let dk: Tensor? = key.requiresGrad ? Tensor(zeros: key.shape) : nil
        let dv: Tensor? = value.requiresGrad ? Tensor(zeros: value.shape) : nil
        // One task per (block, key/value head): the heads of a group add into the same dK/dV columns.
        let work = blocks.filter { $0.kn > 0 }
        let maxBlock = work.map { $0.qn * $0.kn }.max() ?? 0
        parallelFor(work.count * kvHeads, grain: 1) { range in
            let dP = Tensor(uninitialized: [max(maxBlock, 1)])
            let pdP = dP.pointer
            for task in range {
                let block = work[task / kvHeads], kvh = task % kvHeads
                for h in (kvh * group)..<((kvh + 1) * group) {
                    let qOff = (block.b * tq + block.q0) * qStride + h * headDim
                    let kOff = (block.b * tk + block.k0) * kStride + kvh * headDim
                    let pbh = pp + block.probOffset + h * block.qn * block.kn
                    let gbh = pg + qOff
                    if let dv {
                        // dV += Pᵀ dO
                        sgemm(transA: true, transB: false, m: block.kn, n: headDim, k: block.qn,
                              a: pbh, lda: block.kn, b: gbh, ldb: qStride, beta: 1, c: dv.pointer + kOff, ldc: kStride,
                              parallel: false)
                    }
                    guard dq != nil || dk != nil else { continue }
                    // dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
                    sgemm(transA: false, transB: true, m: block.qn, n: block.kn, k: headDim,
                          a: gbh, lda: qStride, b: pv + kOff, ldb: kStride, c: pdP, ldc: block.kn, parallel: false)
                    for i in 0..<block.qn {
                        let prow = pbh + i * block.kn, drow = pdP + i * block.kn
                        let dot = dotProduct(prow, drow, block.kn)
                        for j in 0..<block.kn { drow[j] = prow[j] * (drow[j] - dot) * scale }
                    }
                    if let dq {
                        sgemm(transA: false, transB: false, m: block.qn, n: headDim, k: block.kn,
                              a: pdP, lda: block.kn, b: pk + kOff, ldb: kStride, beta: 1, c: dq.pointer + qOff, ldc: qStride,
                              parallel: false)
                    }
                    if let dk {
                        sgemm(transA: true, transB: false, m: block.kn, n: headDim, k: block.qn,
                              a: pdP, lda: block.kn, b: pq + qOff, ldb: qStride, beta: 1, c: dk.pointer + kOff, ldc: kStride,
                              parallel: false)
                    }
                }
            }
        }
        return [dq, dk, dv]
    }
}
