#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Softmax of one row in place (numerically stable).
@inline(__always)
func softmaxRow(_ p: UnsafeMutablePointer<Float>, _ n: Int) {
    var m = -Float.infinity
    for j in 0..<n { m = max(m, p[j]) }
    if m == -Float.infinity {
        p.update(repeating: 0, count: n)
        return
    }
    var s: Float = 0
    for j in 0..<n {
        let e = expf(p[j] - m)
        p[j] = e
        s += e
    }
    let inv = 1 / s
    for j in 0..<n { p[j] *= inv }
}

/// Softmax over the last dimension.
public func softmax(_ x: Tensor) -> Tensor {
    let n = x.lastDim, rowsN = x.rows
    let out = x.copy()
    let po = out.pointer
    parallelFor(rowsN, grain: max(1, 4096 / max(n, 1))) { range in
        for r in range { softmaxRow(po + r * n, n) }
    }
    return Tensor.result(out, inputs: [x]) { g in
        // dx = y ⊙ (g − Σ g·y)
        let dx = Tensor(zeros: x.shape)
        let py = out.pointer, pg = g.pointer, pd = dx.pointer
        for r in 0..<rowsN {
            let y = py + r * n, gr = pg + r * n, d = pd + r * n
            var dot: Float = 0
            for j in 0..<n { dot += gr[j] * y[j] }
            for j in 0..<n { d[j] = y[j] * (gr[j] - dot) }
        }
        return [dx]
    }
}

/// Log-softmax over the last dimension.
public func logSoftmax(_ x: Tensor) -> Tensor {
    let n = x.lastDim, rowsN = x.rows
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    parallelFor(rowsN, grain: max(1, 4096 / max(n, 1))) { range in
        for r in range {
            let xr = px + r * n, o = po + r * n
            var m = -Float.infinity
            for j in 0..<n { m = max(m, xr[j]) }
            var s: Float = 0
            for j in 0..<n { s += expf(xr[j] - m) }
            let lse = m + logf(s)
            for j in 0..<n { o[j] = xr[j] - lse }
        }
    }
    return Tensor.result(out, inputs: [x]) { g in
        // dx = g − softmax · Σ g
        let dx = Tensor(zeros: x.shape)
        let py = out.pointer, pg = g.pointer, pd = dx.pointer
        for r in 0..<rowsN {
            let y = py + r * n, gr = pg + r * n, d = pd + r * n
            var total: Float = 0
            for j in 0..<n { total += gr[j] }
            for j in 0..<n { d[j] = gr[j] - expf(y[j]) * total }
        }
        return [dx]
    }
}
