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
