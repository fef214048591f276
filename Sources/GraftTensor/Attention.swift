import CGraftSystem

/// Which key positions each query may attend to in ``scaledDotProductAttention(query:key:value:heads:kvHeads:mask:)``.
public struct AttentionMask: Sendable {
    /// Queries see only keys at or before their own position (decoders).
    public var causal: Bool
    /// Per batch row, how many leading key positions are real (the rest is padding); nil = all.
    public var keyLengths: [Int]?
    /// Per token (batch-major, `[batch * queryLength]` and the same ids for keys when self-attending):
    /// a query attends only to keys with the same segment id, so packed sequences never see each other.
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

/// Multi-head scaled dot-product attention, `softmax(Q Kᵀ / √d + mask) V`, with grouped-query heads.
///
/// - `query`: `[batch, queryLength, heads * headDim]`
/// - `key`, `value`: `[batch, keyLength, kvHeads * headDim]`
/// - result: `[batch, queryLength, heads * headDim]`
///
/// Heads are read in place with leading-dimension strides, so no transposes or copies are made. Query head `h`
/// uses key/value head `h / (heads / kvHeads)`. A query row whose keys are all masked outputs zeros.
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
    let probs = Tensor(zeros: [batch, heads, tq, tk])
    let out = Tensor(zeros: query.shape)
    let pq = query.pointer, pk = key.pointer, pv = value.pointer, pp = probs.pointer, po = out.pointer

    // Additive mask per batch row, shared by all heads: 0 where visible, -inf where not.
    let maskT = Tensor(zeros: [batch, tq, tk])
    let pm = maskT.pointer
    var anyMasked = false
    for b in 0..<batch {
        let klen = mask.keyLengths?[b] ?? tk
        for i in 0..<tq {
            let row = pm + (b * tq + i) * tk
            let qpos = mask.queryOffset + i
            let qseg = mask.segments?[b * tq + i]
            for j in 0..<tk {
                var visible = j < klen
                if mask.causal && j > qpos { visible = false }
                if let qseg, let segs = mask.segments, tk == tq, segs[b * tk + j] != qseg { visible = false }
                if !visible { row[j] = -.infinity; anyMasked = true }
            }
        }
    }

    for b in 0..<batch {
        for h in 0..<heads {
            let kvh = h / group
            let qbh = pq + b * tq * qStride + h * headDim
            let kbh = pk + b * tk * kStride + kvh * headDim
            let vbh = pv + b * tk * kStride + kvh * headDim
            let pbh = pp + (b * heads + h) * tq * tk
            sgemm(transA: false, transB: true, m: tq, n: tk, k: headDim, alpha: scale,
                  a: qbh, lda: qStride, b: kbh, ldb: kStride, c: pbh, ldc: tk)
            for i in 0..<tq {
                let row = pbh + i * tk
                if anyMasked {
                    let mrow = pm + (b * tq + i) * tk
                    for j in 0..<tk { row[j] += mrow[j] }
                }
                softmaxRow(row, tk)
            }
            sgemm(transA: false, transB: false, m: tq, n: headDim, k: tk,
                  a: pbh, lda: tk, b: vbh, ldb: kStride, c: po + b * tq * qStride + h * headDim, ldc: qStride)
        }
    }

    return Tensor.result(out, inputs: [query, key, value]) { g in
        let pq = query.pointer, pk = key.pointer, pv = value.pointer, pp = probs.pointer
        let dq: Tensor? = query.requiresGrad ? Tensor(zeros: query.shape) : nil
        let dk: Tensor? = key.requiresGrad ? Tensor(zeros: key.shape) : nil
        let dv: Tensor? = value.requiresGrad ? Tensor(zeros: value.shape) : nil
        let dP = Tensor(zeros: [tq, tk])
        let pdP = dP.pointer, pg = g.pointer
        for b in 0..<batch {
            for h in 0..<heads {
                let kvh = h / group
                let qOff = b * tq * qStride + h * headDim
                let kOff = b * tk * kStride + kvh * headDim
                let pbh = pp + (b * heads + h) * tq * tk
                let gbh = pg + qOff
                if let dv {
                    // dV += Pᵀ dO
                    sgemm(transA: true, transB: false, m: tk, n: headDim, k: tq,
                          a: pbh, lda: tk, b: gbh, ldb: qStride, beta: 1, c: dv.pointer + kOff, ldc: kStride)
                }
                guard dq != nil || dk != nil else { continue }
                // dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
                sgemm(transA: false, transB: true, m: tq, n: tk, k: headDim,
                      a: gbh, lda: qStride, b: pv + kOff, ldb: kStride, c: pdP, ldc: tk)
                for i in 0..<tq {
                    let prow = pbh + i * tk, drow = pdP + i * tk
                    var dot: Float = 0
                    for j in 0..<tk { dot += prow[j] * drow[j] }
                    for j in 0..<tk { drow[j] = prow[j] * (drow[j] - dot) * scale }
                }
                if let dq {
                    sgemm(transA: false, transB: false, m: tq, n: headDim, k: tk,
                          a: pdP, lda: tk, b: pk + kOff, ldb: kStride, c: dq.pointer + qOff, ldc: qStride)
                }
                if let dk {
                    sgemm(transA: true, transB: false, m: tk, n: headDim, k: tq,
                          a: pdP, lda: tk, b: pq + qOff, ldb: qStride, beta: 1, c: dk.pointer + kOff, ldc: kStride)
                }
            }
        }
        return [dq, dk, dv]
    }
}
