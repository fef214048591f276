/// 16 floats at `p + j`.
@inline(__always)
private func load16(_ p: UnsafePointer<Float>, _ j: Int) -> Float16x {
    UnsafeRawPointer(p + j).loadUnaligned(as: Float16x.self)
}

/// Stores 16 floats at `p + j`.
@inline(__always)
private func store16(_ v: Float16x, _ p: UnsafeMutablePointer<Float>, _ j: Int) {
    UnsafeMutableRawPointer(p + j).storeBytes(of: v, as: Float16x.self)
}

/// LayerNorm over the last dimension: `(x − μ) / √(σ² + eps) · weight + bias`.
///
/// Keeps only μ and 1/σ per row for backward (the normalized rows are recomputed from the input there), and runs
/// 16 lanes at a time with a scalar tail, rows split over the threads.
public func layerNorm(_ x: Tensor, weight: Tensor, bias: Tensor?, eps: Float) -> Tensor {
    let n = x.lastDim, rowsN = x.rows
    precondition(weight.count == n, "layerNorm: weight \(weight.shape) vs input \(x.shape)")
    let out = Tensor(uninitialized: x.shape)
    let stats = Tensor(uninitialized: [rowsN, 2])  // μ, 1/σ
    let px = x.pointer, po = out.pointer, pw = weight.pointer, ps = stats.pointer
    let pb = bias?.pointer
    let vectorEnd = n & ~15
    parallelFor(rowsN, grain: 16) { range in
        for r in range {
            let xr = px + r * n, o = po + r * n
            var sum = splat(0)
            var j = 0
            while j < vectorEnd { sum += load16(xr, j); j += 16 }
            var total = sum.sum()
            while j < n { total += xr[j]; j += 1 }
            let mu = total / Float(n), m = splat(mu)
            var squares = splat(0)
            j = 0
            while j < vectorEnd { let d = load16(xr, j) - m; squares += d * d; j += 16 }
            var variance = squares.sum()
            while j < n { let d = xr[j] - mu; variance += d * d; j += 1 }
            let inv = 1 / (variance / Float(n) + eps).squareRoot(), iv = splat(inv)
            ps[2 * r] = mu
            ps[2 * r + 1] = inv
            j = 0
            if let pb {
                while j < vectorEnd { store16((load16(xr, j) - m) * iv * load16(pw, j) + load16(pb, j), o, j); j += 16 }
                while j < n { o[j] = (xr[j] - mu) * inv * pw[j] + pb[j]; j += 1 }
            } else {
                while j < vectorEnd { store16((load16(xr, j) - m) * iv * load16(pw, j), o, j); j += 16 }
                while j < n { o[j] = (xr[j] - mu) * inv * pw[j]; j += 1 }
            }
        }
    }
    var inputs = [x, weight]
    if let bias { inputs.append(bias) }
    return Tensor.result(out, inputs: inputs) { g in
        let px = x.pointer, pw = weight.pointer, ps = stats.pointer, pg = g.pointer
        var dx: Tensor? = nil, dw: Tensor? = nil, db: Tensor? = nil
        if x.requiresGrad {
            let t = Tensor(uninitialized: x.shape)
            let pd = t.pointer
            parallelFor(rowsN, grain: 16) { range in
                for r in range {
                    let gr = pg + r * n, xr = px + r * n, d = pd + r * n
                    let mu = ps[2 * r], inv = ps[2 * r + 1], m = splat(mu), iv = splat(inv)
                    // dx = (g·w − mean(g·w) − x̂ · mean(g·w·x̂)) / σ
                    var a1 = splat(0), a2 = splat(0)
                    var j = 0
                    while j < vectorEnd {
                        let gh = load16(gr, j) * load16(pw, j)
                        a1 += gh
                        a2 += gh * ((load16(xr, j) - m) * iv)
                        j += 16
                    }
                    var s1 = a1.sum(), s2 = a2.sum()
                    while j < n { let gh = gr[j] * pw[j]; s1 += gh; s2 += gh * (xr[j] - mu) * inv; j += 1 }
                    s1 /= Float(n)
                    s2 /= Float(n)
                    let v1 = splat(s1), v2 = splat(s2)
                    j = 0
                    while j < vectorEnd {
                        let h = (load16(xr, j) - m) * iv
                        store16(iv * (load16(gr, j) * load16(pw, j) - v1 - h * v2), d, j)
                        j += 16
                    }
                    while j < n { d[j] = inv * (gr[j] * pw[j] - s1 - (xr[j] - mu) * inv * s2); j += 1 }
                }
            }
            dx = t
        }
        if weight.requiresGrad {
            let t = Tensor(zeros: weight.shape)
            let pd = t.pointer
            for r in 0..<rowsN {
                let mu = ps[2 * r], inv = ps[2 * r + 1]
                for j in 0..<n { pd[j] += pg[r * n + j] * (px[r * n + j] - mu) * inv }
            }
            dw = t
        }
        if let bias, bias.requiresGrad { db = g.sumToShape(bias.shape) }
        return [dx, dw, db]
    }
}

/// RMSNorm over the last dimension: `x / √(mean(x²) + eps) · weight` (Llama), 16 lanes at a time.
public func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float) -> Tensor {
    let n = x.lastDim, rowsN = x.rows
    precondition(weight.count == n, "rmsNorm: weight \(weight.shape) vs input \(x.shape)")
    let out = Tensor(uninitialized: x.shape)
    let invRms = Tensor(uninitialized: [rowsN])
    let px = x.pointer, po = out.pointer, pw = weight.pointer, pir = invRms.pointer
    let vectorEnd = n & ~15
    parallelFor(rowsN, grain: 16) { range in
        for r in range {
            let xr = px + r * n, o = po + r * n
            var squares = splat(0)
            var j = 0
            while j < vectorEnd { let v = load16(xr, j); squares += v * v; j += 16 }
            var ss = squares.sum()
            while j < n { ss += xr[j] * xr[j]; j += 1 }
            let inv = 1 / (ss / Float(n) + eps).squareRoot(), iv = splat(inv)
            pir[r] = inv
            j = 0
            while j < vectorEnd { store16(load16(xr, j) * iv * load16(pw, j), o, j); j += 16 }
            while j < n { o[j] = xr[j] * inv * pw[j]; j += 1 }
        }
    }
    return Tensor.result(out, inputs: [x, weight]) { g in
        let pir = invRms.pointer, px = x.pointer, pw = weight.pointer
        let pg = g.pointer
        var dx: Tensor? = nil, dw: Tensor? = nil
        if x.requiresGrad {
            let t = Tensor(uninitialized: x.shape)
            let pd = t.pointer
            parallelFor(rowsN, grain: 16) { range in
                for r in range {
                    let gr = pg + r * n, xr = px + r * n, d = pd + r * n
                    let inv = pir[r], iv = splat(inv)
                    var dots = splat(0)
                    var j = 0
                    while j < vectorEnd { dots += load16(gr, j) * load16(pw, j) * load16(xr, j); j += 16 }
                    var dot = dots.sum()
                    while j < n { dot += gr[j] * pw[j] * xr[j]; j += 1 }
                    let c = dot * inv * inv * inv / Float(n), vc = splat(c)
                    j = 0
                    while j < vectorEnd { store16(load16(gr, j) * load16(pw, j) * iv - load16(xr, j) * vc, d, j); j += 16 }
                    while j < n { d[j] = gr[j] * pw[j] * inv - xr[j] * c; j += 1 }
                }
            }
            dx = t
        }
        if weight.requiresGrad {
            let t = Tensor(zeros: weight.shape)
            let pd = t.pointer
            for r in 0..<rowsN {
                let inv = pir[r]
                for j in 0..<n { pd[j] += pg[r * n + j] * px[r * n + j] * inv }
            }
            dw = t
        }
        return [dx, dw]
    }
}
