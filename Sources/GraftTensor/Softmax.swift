#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Softmax of one row in place (numerically stable).
@inline(__always)
func softmaxRow(_ p: UnsafeMutablePointer<Float>, _ n: Int) {
    let m = rowMax(p, n)
    if m == -Float.infinity {
        p.update(repeating: 0, count: n)
        return
    }
    scaleProbabilities(p, n, by: 1 / expShiftInPlace(p, n, shift: m))
}

/// `p[j] *= scale`, with results smaller in magnitude than the smallest normal float set to zero.
/// A subnormal operand costs a microcode assist per multiply on Intel cores, so one in a softmax row slowed every
/// product that read the row (attention's `P·V`, the LM head's gradient) by more than ten times; it adds nothing a
/// float32 sum could keep.
@inline(__always)
func scaleProbabilities(_ p: UnsafeMutablePointer<Float>, _ n: Int, by scale: Float) {
    let tiny = splat(.leastNormalMagnitude), negativeTiny = splat(-.leastNormalMagnitude)
    var i = 0
    while i + 16 <= n {
        var v = UnsafeRawPointer(p + i).loadUnaligned(as: Float16x.self) * splat(scale)
        v.replace(with: 0, where: (v .< tiny) .& (v .> negativeTiny))
        UnsafeMutableRawPointer(p + i).storeBytes(of: v, as: Float16x.self)
        i += 16
    }
    while i < n {
        let v = p[i] * scale
        p[i] = v.magnitude < .leastNormalMagnitude ? 0 : v
        i += 1
    }
}

/// The largest of `n` values, 16 lanes at a time.
@inline(__always)
func rowMax(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
    var m = -Float.infinity
    var i = 0
    if n >= 16 {
        // A masked replace vectorizes; the generic pointwiseMax and max() do not.
        var lanes = Float16x(repeating: -.infinity)
        while i + 16 <= n {
            let v = UnsafeRawPointer(p + i).loadUnaligned(as: Float16x.self)
            lanes.replace(with: v, where: v .> lanes)
            i += 16
        }
        for lane in 0..<16 { m = max(m, lanes[lane]) }
    }
    while i < n {
        m = max(m, p[i])
        i += 1
    }
    return m
}

/// `p[j] = exp(p[j] − shift)` for `j < n`; returns the sum (accumulated per lane, then in Double).
@inline(__always)
func expShiftInPlace(_ p: UnsafeMutablePointer<Float>, _ n: Int, shift: Float) -> Float {
    var acc = Float16x(repeating: 0)
    var i = 0
    while i + 16 <= n {
        let e = vexp(UnsafeRawPointer(p + i).loadUnaligned(as: Float16x.self) - splat(shift))
        UnsafeMutableRawPointer(p + i).storeBytes(of: e, as: Float16x.self)
        acc += e
        i += 16
    }
    var s = Double(acc.sum())
    while i < n {
        let e = expf(p[i] - shift)
        p[i] = e
        s += Double(e)
        i += 1
    }
    return Float(s)
}

/// `Σ exp(p[j] − shift)` without writing (for log-sum-exp), in Double.
@inline(__always)
func expShiftSum(_ p: UnsafePointer<Float>, _ n: Int, shift: Float) -> Double {
    var acc = Float16x(repeating: 0)
    var i = 0
    while i + 16 <= n {
        acc += vexp(UnsafeRawPointer(p + i).loadUnaligned(as: Float16x.self) - splat(shift))
        i += 16
    }
    var s = Double(acc.sum())
    while i < n {
        s += Double(expf(p[i] - shift))
        i += 1
    }
    return s
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
            let m = rowMax(xr, n)
            let lse = m + Float(log(expShiftSum(xr, n, shift: m)))
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
