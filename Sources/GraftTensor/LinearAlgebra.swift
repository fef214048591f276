import CGraftSystem

/// Inverses of a batch of small square matrices: `a` is `[n, n]` or `[batch, n, n]`, recorded for autograd.
///
/// Each matrix is inverted by Gauss–Jordan elimination with partial pivoting in Float64 (meant for the small
/// blocks orthogonal adapters use, such as BOFT's Cayley transform `(I − S)(I + S)⁻¹`). A singular matrix gives
/// non-finite entries rather than trapping. Backward: `∂A = −A⁻ᵀ ∂(A⁻¹) A⁻ᵀ`.
public func inverse(_ a: Tensor) -> Tensor {
    precondition((a.rank == 2 || a.rank == 3) && a.shape[a.rank - 1] == a.shape[a.rank - 2],
                 "inverse: square matrices expected, got \(a.shape)")
    let n = a.shape[a.rank - 1]
    let batch = a.rank == 3 ? a.shape[0] : 1
    let out = Tensor(zeros: a.shape)
    var work = [Double](repeating: 0, count: 2 * n * n)
    let pa = a.pointer, po = out.pointer
    for b in 0..<batch {
        let base = b * n * n
        // work = [A | I], row-major with 2n columns.
        for i in 0..<n {
            for j in 0..<n {
                work[i * 2 * n + j] = Double(pa[base + i * n + j])
                work[i * 2 * n + n + j] = i == j ? 1 : 0
            }
        }
        for col in 0..<n {
            var pivot = col
            for r in (col + 1)..<max(col + 1, n) where abs(work[r * 2 * n + col]) > abs(work[pivot * 2 * n + col]) { pivot = r }
            if pivot != col {
                for j in 0..<(2 * n) { work.swapAt(col * 2 * n + j, pivot * 2 * n + j) }
            }
            let inv = 1 / work[col * 2 * n + col]
            for j in 0..<(2 * n) { work[col * 2 * n + j] *= inv }
            for r in 0..<n where r != col {
                let f = work[r * 2 * n + col]
                if f == 0 { continue }
                for j in 0..<(2 * n) { work[r * 2 * n + j] -= f * work[col * 2 * n + j] }
            }
        }
        for i in 0..<n { for j in 0..<n { po[base + i * n + j] = Float(work[i * 2 * n + n + j]) } }
    }
    return Tensor.result(out, inputs: [a]) { g in
        // ∂A_b = −(A_b⁻¹)ᵀ G_b (A_b⁻¹)ᵀ.
        let d = Tensor(zeros: a.shape)
        let t = Tensor(zeros: [n, n])
        for b in 0..<batch {
            let off = b * n * n
            sgemm(transA: true, transB: false, m: n, n: n, k: n, a: out.pointer + off, b: g.pointer + off, c: t.pointer, parallel: false)
            sgemm(transA: false, transB: true, m: n, n: n, k: n, alpha: -1, a: t.pointer, b: out.pointer + off,
                  c: d.pointer + off, parallel: false)
        }
        return [d]
    }
}

/// The thin singular value decomposition of a row-major `[m, n]` matrix: `a = u · diag(s) · vt` with
/// `u: [m, k]`, `s: [k]` (descending, ≥ 0), `vt: [k, n]`, `k = min(m, n)`. Not recorded for autograd.
///
/// Computed by LAPACK's divide-and-conquer `sgesdd` (OpenBLAS). A row-major `[m, n]` buffer is the
/// column-major `aᵀ`, so LAPACK factors `aᵀ = V S Uᵀ`, whose column-major factors are, read row-major, exactly
/// `vt` and `u`: no transposes are needed. `what` names the matrix in errors (a layer path). Throws for a
/// non-2-D or empty matrix, non-finite entries, or when LAPACK does not converge.
public func svd(_ a: Tensor, what: String = "matrix") throws -> (u: Tensor, s: Tensor, vt: Tensor) {
    let (m, n, k) = try svdShape(a, what: what)
    let f = try thinSVD(Array(UnsafeBufferPointer(start: a.pointer, count: a.count)), m: m, n: n, what: what)
    return (Tensor(shape: [m, k], values: f.u), Tensor(shape: [k], values: f.s), Tensor(shape: [k, n], values: f.vt))
}

/// ``svd(_:what:)`` computed in Float64 (LAPACK `dgesdd`), the factors row-major as Float64 arrays (`u` `[m, k]`,
/// `s` `[k]`, `vt` `[k, n]`): for products of many factors that must round only once (OSF's frozen part).
public func svdFloat64(_ a: Tensor, what: String = "matrix") throws -> (u: [Double], s: [Double], vt: [Double]) {
    let (m, n, _) = try svdShape(a, what: what)
    return try thinSVD(UnsafeBufferPointer(start: a.pointer, count: a.count).map(Double.init), m: m, n: n, what: what)
}

private func svdShape(_ a: Tensor, what: String) throws -> (m: Int, n: Int, k: Int) {
    guard a.rank == 2, a.shape[0] > 0, a.shape[1] > 0 else {
        throw GraftError.invalid("svd of \(what): a non-empty 2-D matrix is required, got shape \(a.shape)")
    }
    let m = a.shape[0], n = a.shape[1]
    guard m <= Int(Int32.max) / max(n, 1) else { throw GraftError.invalid("svd of \(what): \(a.shape) is too large for LAPACK") }
    if let i = (0..<a.count).first(where: { !a.pointer[$0].isFinite }) {
        throw GraftError.invalid("svd of \(what): entry \(i) is \(a.pointer[i]) (not finite)")
    }
    return (m, n, min(m, n))
}

/// A floating-point type LAPACK's thin `?gesdd` handles.
private protocol LAPACKReal: BinaryFloatingPoint {
    static func gesddThin(_ m: Int32, _ n: Int32, _ a: UnsafeMutablePointer<Self>?, _ lda: Int32, _ s: UnsafeMutablePointer<Self>?,
                          _ u: UnsafeMutablePointer<Self>?, _ ldu: Int32, _ vt: UnsafeMutablePointer<Self>?, _ ldvt: Int32,
                          _ work: UnsafeMutablePointer<Self>?, _ lwork: Int32, _ iwork: UnsafeMutablePointer<Int32>?) -> Int32
}

extension Float: LAPACKReal {
    fileprivate static func gesddThin(_ m: Int32, _ n: Int32, _ a: UnsafeMutablePointer<Float>?, _ lda: Int32, _ s: UnsafeMutablePointer<Float>?,
                                      _ u: UnsafeMutablePointer<Float>?, _ ldu: Int32, _ vt: UnsafeMutablePointer<Float>?, _ ldvt: Int32,
                                      _ work: UnsafeMutablePointer<Float>?, _ lwork: Int32, _ iwork: UnsafeMutablePointer<Int32>?) -> Int32 {
        cgraft_sgesdd_thin(m, n, a, lda, s, u, ldu, vt, ldvt, work, lwork, iwork)
    }
}

extension Double: LAPACKReal {
    fileprivate static func gesddThin(_ m: Int32, _ n: Int32, _ a: UnsafeMutablePointer<Double>?, _ lda: Int32, _ s: UnsafeMutablePointer<Double>?,
                                      _ u: UnsafeMutablePointer<Double>?, _ ldu: Int32, _ vt: UnsafeMutablePointer<Double>?, _ ldvt: Int32,
                                      _ work: UnsafeMutablePointer<Double>?, _ lwork: Int32, _ iwork: UnsafeMutablePointer<Int32>?) -> Int32 {
        cgraft_dgesdd_thin(m, n, a, lda, s, u, ldu, vt, ldvt, work, lwork, iwork)
    }
}

/// The thin SVD of the row-major `[m, n]` matrix in `work` (overwritten), factors row-major.
private func thinSVD<T: LAPACKReal>(_ input: [T], m: Int, n: Int, what: String) throws -> (u: [T], s: [T], vt: [T]) {
    var work = input
    let k = min(m, n)
    var u = [T](repeating: 0, count: m * k), s = [T](repeating: 0, count: k), vt = [T](repeating: 0, count: k * n)
    var iwork = [Int32](repeating: 0, count: 8 * k)
    // LAPACK's view: the column-major n×m matrix aᵀ (lda = n); its U (n×k, ldu = n) is our vt, its Vᵀ
    // (k×m, ldvt = k) is our u.
    func call(_ scratch: inout [T], _ lwork: Int32) -> Int32 {
        work.withUnsafeMutableBufferPointer { pa in
            iwork.withUnsafeMutableBufferPointer { pi in
                scratch.withUnsafeMutableBufferPointer { pw in
                    s.withUnsafeMutableBufferPointer { ps in
                        vt.withUnsafeMutableBufferPointer { pv in
                            u.withUnsafeMutableBufferPointer { pu in
                                T.gesddThin(Int32(n), Int32(m), pa.baseAddress, Int32(n), ps.baseAddress, pv.baseAddress, Int32(n),
                                            pu.baseAddress, Int32(k), pw.baseAddress, lwork, pi.baseAddress)
                            }
                        }
                    }
                }
            }
        }
    }
    var query = [T](repeating: 0, count: 1)
    var info = call(&query, -1)
    guard info == 0 else { throw GraftError(.internalError, "svd of \(what): LAPACK ?gesdd workspace query failed (info \(info))") }
    var scratch = [T](repeating: 0, count: max(1, Int(Double(query[0]).rounded(.up)) + 1))
    info = call(&scratch, Int32(scratch.count))
    guard info == 0 else {
        throw GraftError(.internalError, "svd of \(what) [\(m), \(n)]: LAPACK ?gesdd did not converge (info \(info))")
    }
    return (u, s, vt)
}

/// The thin QR decomposition of a row-major `[m, n]` matrix: `a = q · r` with `q: [m, k]` (orthonormal columns)
/// and `r: [k, n]` (upper triangular), `k = min(m, n)`. Not recorded for autograd.
///
/// Computed by LAPACK's Householder `sgeqrf` and `sorgqr` (OpenBLAS), the routines behind PyTorch's
/// `torch.linalg.qr` on the CPU, so signs follow the same convention (R's diagonal may be negative). `what` names
/// the matrix in errors. Throws for a non-2-D or empty matrix, non-finite entries, or a LAPACK failure.
public func qr(_ a: Tensor, what: String = "matrix") throws -> (q: Tensor, r: Tensor) {
    guard a.rank == 2, a.shape[0] > 0, a.shape[1] > 0 else {
        throw GraftError.invalid("qr of \(what): a non-empty 2-D matrix is required, got shape \(a.shape)")
    }
    let m = a.shape[0], n = a.shape[1], k = min(m, n)
    guard m <= Int(Int32.max) / max(n, 1) else { throw GraftError.invalid("qr of \(what): \(a.shape) is too large for LAPACK") }
    // Column-major copy of a (LAPACK's layout): work[i + j·m] = a[i, j].
    var work = [Float](repeating: 0, count: m * n)
    let pa = a.pointer
    for i in 0..<m {
        for j in 0..<n {
            let v = pa[i * n + j]
            guard v.isFinite else { throw GraftError.invalid("qr of \(what): entry [\(i), \(j)] is \(v) (not finite)") }
            work[i + j * m] = v
        }
    }
    var tau = [Float](repeating: 0, count: k)
    var query: Float = 0
    var info = work.withUnsafeMutableBufferPointer { w in cgraft_sgeqrf(Int32(m), Int32(n), w.baseAddress, Int32(m), &tau, &query, -1) }
    guard info == 0 else { throw GraftError(.internalError, "qr of \(what): LAPACK sgeqrf workspace query failed (info \(info))") }
    var scratch = [Float](repeating: 0, count: max(1, Int(query.rounded(.up)) + n))
    info = work.withUnsafeMutableBufferPointer { w in
        scratch.withUnsafeMutableBufferPointer { s in
            cgraft_sgeqrf(Int32(m), Int32(n), w.baseAddress, Int32(m), &tau, s.baseAddress, Int32(s.count))
        }
    }
    guard info == 0 else { throw GraftError(.internalError, "qr of \(what) \(a.shape): LAPACK sgeqrf failed (info \(info))") }
    let r = Tensor(zeros: [k, n])
    for i in 0..<k { for j in i..<n { r.pointer[i * n + j] = work[i + j * m] } }
    info = work.withUnsafeMutableBufferPointer { w in
        scratch.withUnsafeMutableBufferPointer { s in
            cgraft_sorgqr(Int32(m), Int32(k), Int32(k), w.baseAddress, Int32(m), tau, s.baseAddress, Int32(s.count))
        }
    }
    guard info == 0 else { throw GraftError(.internalError, "qr of \(what) \(a.shape): LAPACK sorgqr failed (info \(info))") }
    let q = Tensor(zeros: [m, k])
    for i in 0..<m { for j in 0..<k { q.pointer[i * k + j] = work[i + j * m] } }
    return (q, r)
}

/// `aᵀ · bᵀ` for row-major Float64 matrices `a` `[k, m]` and `b` `[n, ldb]` (its first `k` columns), multiplied
/// in Float64 (`dgemm`) and rounded once into a float32 tensor `[m, n]`: a product of SVD factors from
/// ``svdFloat64(_:what:)`` without float32 rounding in its sum.
public func transposedProductFloat64(_ a: [Double], _ b: [Double], m: Int, n: Int, k: Int, ldb: Int) -> Tensor {
    precondition(a.count >= k * m && b.count >= n * ldb && ldb >= k, "transposedProductFloat64: factor sizes")
    var c = [Double](repeating: 0, count: m * n)
    if k > 0 {
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(m), b, Int32(ldb), 0, &c, Int32(n))
    }
    return Tensor(shape: [m, n], values: c.map(Float.init))
}
