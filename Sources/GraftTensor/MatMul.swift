import CGraftSystem

/// `C[m×n] = alpha · op(A) · op(B) + beta · C`, row-major, with transpose flags instead of copies.
///
/// `A` is stored `m×k` (or `k×m` when `transA`), `B` is `k×n` (or `n×k` when `transB`).
/// Large products are split into row (or column) blocks run on Graft's threads, each a single-threaded BLAS
/// call: one thread pool for the whole process, none spinning while the other works. `parallel: false` keeps
/// the call on the current thread (for callers that are already parallel).
@inline(__always)
public func sgemm(
    transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
    alpha: Float = 1, a: UnsafePointer<Float>, lda: Int? = nil,
    b: UnsafePointer<Float>, ldb: Int? = nil,
    beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int? = nil, parallel: Bool = true
) {
    let lda = lda ?? (transA ? m : k), ldb = ldb ?? (transB ? k : n), ldc = ldc ?? n
    let threads = Threading.threads
    if parallel && threads > 1 && m == 1 && n >= 8 * threads && n * k >= 1 << 13 {
        // One row (decoding through an unmerged adapter): the product streams all of B once, so its columns are
        // split over the threads (each a GEMV on its share of B).
        let per = ((n + threads - 1) / threads + 7) / 8 * 8
        parallelFor((n + per - 1) / per, grain: 1) { range in
            for blk in range {
                let j0 = blk * per, cols = min(per, n - j0)
                if cols <= 0 { continue }
                sgemmSerial(transA: transA, transB: transB, m: 1, n: cols, k: k, alpha: alpha, a: a, lda: lda,
                            b: transB ? b + j0 * ldb : b + j0, ldb: ldb, beta: beta, c: c + j0, ldc: ldc)
            }
        }
        return
    }
    if parallel && threads > 1 && m * n * k >= 1 << 20 {
        // Column blocks of C scale almost linearly with OpenBLAS 0.3.21's single-threaded kernels; row blocks
        // measured at half speed when run concurrently, so rows are split only when C is too narrow.
        if n >= 64 * threads {
            let per = ((n + threads - 1) / threads + 15) / 16 * 16
            parallelFor((n + per - 1) / per, grain: 1) { range in
                for blk in range {
                    let j0 = blk * per, cols = min(per, n - j0)
                    if cols <= 0 { continue }
                    sgemmSerial(transA: transA, transB: transB, m: m, n: cols, k: k, alpha: alpha,
                                a: a, lda: lda, b: transB ? b + j0 * ldb : b + j0, ldb: ldb, beta: beta,
                                c: c + j0, ldc: ldc)
                }
            }
            return
        }
        if m >= 32 * threads {
            let per = ((m + threads - 1) / threads + 7) / 8 * 8
            parallelFor((m + per - 1) / per, grain: 1) { range in
                for blk in range {
                    let i0 = blk * per, rows = min(per, m - i0)
                    if rows <= 0 { continue }
                    sgemmSerial(transA: transA, transB: transB, m: rows, n: n, k: k, alpha: alpha,
                                a: transA ? a + i0 : a + i0 * lda, lda: lda, b: b, ldb: ldb, beta: beta,
                                c: c + i0 * ldc, ldc: ldc)
                }
            }
            return
        }
    }
    sgemmSerial(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda, b: b, ldb: ldb,
                beta: beta, c: c, ldc: ldc)
}

/// One BLAS call on the current thread.
@inline(__always)
func sgemmSerial(
    transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
    b: UnsafePointer<Float>, ldb: Int, beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
) {
    if m == 0 || n == 0 { return }
    if k == 0 {
        if beta == 0 {
            for i in 0..<m { (c + i * ldc).update(repeating: 0, count: n) }
        } else if beta != 1 {
            for i in 0..<m { for j in 0..<n { c[i * ldc + j] *= beta } }
        }
        return
    }
    if m == 1 {
        // One row (a decoding step, an adapter's small projections): a GEMV, which skips sgemm's packing.
        if beta == 0 { c.update(repeating: 0, count: n) }
        let incx = Int32(transA ? lda : 1)
        if transB {
            cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(n), Int32(k), alpha, b, Int32(ldb), a, incx, beta == 0 ? 1 : beta, c, 1)
        } else {
            cblas_sgemv(CblasRowMajor, CblasTrans, Int32(k), Int32(n), alpha, b, Int32(ldb), a, incx, beta == 0 ? 1 : beta, c, 1)
        }
        return
    }
    cblas_sgemm(
        CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
        Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
}

/// `y[m] = alpha · A · x + beta · y` for a row-major `[m, n]` matrix `A` (leading dimension `lda`, default `n`):
/// one BLAS matrix-vector product on the current thread, for products too small for a GEMM call to pay off.
@inline(__always)
public func sgemv(m: Int, n: Int, alpha: Float = 1, a: UnsafePointer<Float>, lda: Int? = nil, x: UnsafePointer<Float>,
                  beta: Float = 0, y: UnsafeMutablePointer<Float>) {
    guard m > 0 else { return }
    guard n > 0 else {
        for i in 0..<m { y[i] = beta == 0 ? 0 : beta * y[i] }
        return
    }
    cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(m), Int32(n), alpha, a, Int32(lda ?? n), x, 1, beta, y, 1)
}

/// The output of a Linear layer over `x` before its product: `[..., outFeatures]`, each row holding `bias` (to be
/// accumulated into), or zeros when there is no input width, else uninitialized (the product overwrites it).
func linearOutput(_ x: Tensor, inFeatures: Int, outFeatures: Int, bias: Tensor?) -> Tensor {
    var shape = x.shape
    shape[shape.count - 1] = outFeatures
    let out = inFeatures == 0 || bias != nil ? Tensor(zeros: shape) : Tensor(uninitialized: shape)
    if let bias {
        let pb = bias.pointer, po = out.pointer
        for r in 0..<x.rows { (po + r * outFeatures).update(from: pb, count: outFeatures) }
    }
    return out
}

/// `x · Wᵀ (+ bias)`: the Linear layer. `x` is `[..., in]`, `weight` is `[out, in]`, `bias` is `[out]`.
///
/// Backward computes `dx = dy · W` only when `x` is tracked and `dW = dyᵀ · x` only when `W` is trainable,
/// so a frozen weight costs one GEMM in backward and allocates nothing for itself.
public func linear(_ x: Tensor, _ weight: Tensor, _ bias: Tensor? = nil) -> Tensor {
    let inF = weight.shape[1], outF = weight.shape[0]
    precondition(x.lastDim == inF, "linear: input \(x.shape) does not end in \(inF)")
    let rowsN = x.rows
    let out = linearOutput(x, inFeatures: inF, outFeatures: outF, bias: bias)
    sgemm(transA: false, transB: true, m: rowsN, n: outF, k: inF,
          a: x.pointer, b: weight.pointer, beta: bias == nil ? 0 : 1, c: out.pointer)
    var inputs = [x, weight]
    if let bias { inputs.append(bias) }
    // The input is kept only for a trainable weight's gradient, the weight only for the input's.
    let keepX: Tensor? = weight.requiresGrad ? x : nil, keepW: Tensor? = x.requiresGrad ? weight : nil
    let xShape = x.shape, wShape = weight.shape, biasShape: [Int]? = (bias?.requiresGrad ?? false) ? bias?.shape : nil
    return Tensor.result(out, inputs: inputs) { g in
        var dx: Tensor? = nil, dw: Tensor? = nil
        if let weight = keepW {
            let t = outF == 0 ? Tensor(zeros: xShape) : Tensor(uninitialized: xShape)
            sgemm(transA: false, transB: false, m: rowsN, n: inF, k: outF,
                  a: g.pointer, b: weight.pointer, c: t.pointer)
            dx = t
        }
        if let x = keepX {
            let t = Tensor(zeros: wShape)
            sgemm(transA: true, transB: false, m: outF, n: inF, k: rowsN,
                  a: g.pointer, b: x.pointer, c: t.pointer)
            dw = t
        }
        return [dx, dw, biasShape.map { g.sumToShape($0) }]
    }
}

/// Matrix product of the last two dimensions, batched over one leading dimension when both are 3-D.
///
/// Shapes: `a` is `[M, K]` or `[B, M, K]` (`[.., K, M]` with `transposeA`), `b` is `[K, N]` or `[B, K, N]`
/// (`[.., N, K]` with `transposeB`). A 2-D `b` is shared by every batch of a 3-D `a`.
public func matmul(_ a: Tensor, _ b: Tensor, transposeA: Bool = false, transposeB: Bool = false) -> Tensor {
    precondition(a.rank == 2 || a.rank == 3, "matmul: a must be 2-D or 3-D, got \(a.shape)")
    precondition(b.rank == 2 || b.rank == 3, "matmul: b must be 2-D or 3-D, got \(b.shape)")
    let batch = a.rank == 3 ? a.shape[0] : 1
    let bBatched = b.rank == 3
    if bBatched { precondition(a.rank == 3 && b.shape[0] == batch, "matmul: batch \(a.shape) vs \(b.shape)") }
    let ar = a.shape[a.rank - 2], ac = a.shape[a.rank - 1]
    let br = b.shape[b.rank - 2], bc = b.shape[b.rank - 1]
    let m = transposeA ? ac : ar, k = transposeA ? ar : ac
    let kb = transposeB ? bc : br, n = transposeB ? br : bc
    precondition(k == kb, "matmul: inner dimensions \(a.shape) vs \(b.shape) differ")
    let out = Tensor(zeros: a.rank == 3 ? [batch, m, n] : [m, n])
    let aStride = ar * ac, bStride = bBatched ? br * bc : 0
    for i in 0..<batch {
        sgemm(transA: transposeA, transB: transposeB, m: m, n: n, k: k,
              a: a.pointer + i * aStride, b: b.pointer + i * bStride, c: out.pointer + i * m * n)
    }
    return Tensor.result(out, inputs: [a, b]) { g in
        var da: Tensor? = nil, db: Tensor? = nil
        if a.requiresGrad {
            let t = Tensor(zeros: a.shape)
            for i in 0..<batch {
                // dA = dC · op(B)ᵀ, stored transposed when A was.
                if transposeA {
                    sgemm(transA: transposeB, transB: true, m: k, n: m, k: n,
                          a: b.pointer + i * bStride, b: g.pointer + i * m * n, c: t.pointer + i * aStride)
                } else {
                    sgemm(transA: false, transB: !transposeB, m: m, n: k, k: n,
                          a: g.pointer + i * m * n, b: b.pointer + i * bStride, c: t.pointer + i * aStride)
                }
            }
            da = t
        }
        if b.requiresGrad {
            let t = Tensor(zeros: b.shape)
            for i in 0..<batch {
                // dB = op(A)ᵀ · dC, stored transposed when B was; a shared B accumulates over the batch.
                let beta: Float = (!bBatched && i > 0) ? 1 : 0
                if transposeB {
                    sgemm(transA: true, transB: transposeA, m: n, n: k, k: m,
                          a: g.pointer + i * m * n, b: a.pointer + i * aStride, beta: beta,
                          c: t.pointer + i * bStride)
                } else {
                    sgemm(transA: !transposeA, transB: false, m: k, n: n, k: m,
                          a: a.pointer + i * aStride, b: g.pointer + i * m * n, beta: beta,
                          c: t.pointer + i * bStride)
                }
            }
            db = t
        }
        return [da, db]
    }
}
