/// LayerNorm over the last dimension: `(x − μ) / √(σ² + eps) · weight + bias`.
public func layerNorm(_ x: Tensor, weight: Tensor, bias: Tensor?, eps: Float) -> Tensor {
    let n = x.lastDim, rowsN = x.rows
    precondition(weight.count == n, "layerNorm: weight \(weight.shape) vs input \(x.shape)")
    let out = Tensor(uninitialized: x.shape)
    let xhat = Tensor(uninitialized: x.shape)
    let invStd = Tensor(uninitialized: [rowsN])
    let px = x.pointer, po = out.pointer, ph = xhat.pointer, pw = weight.pointer, pis = invStd.pointer
    let pb = bias?.pointer
    parallelFor(rowsN, grain: 16) { range in
        for r in range {
            let xr = px + r * n, o = po + r * n, h = ph + r * n
            var mu: Float = 0
            for j in 0..<n { mu += xr[j] }
            mu /= Float(n)
            var v: Float = 0
            for j in 0..<n { let d = xr[j] - mu; v += d * d }
            v /= Float(n)
            let inv = 1 / (v + eps).squareRoot()
            pis[r] = inv
            for j in 0..<n {
                let hv = (xr[j] - mu) * inv
                h[j] = hv
                o[j] = hv * pw[j] + (pb?[j] ?? 0)
            }
        }
    }
    var inputs = [x, weight]
    if let bias { inputs.append(bias) }
    return Tensor.result(out, inputs: inputs) { g in
        // Saved activations are re-read through the captured tensors, which keeps them alive until now.
        let ph = xhat.pointer, pis = invStd.pointer, px = x.pointer, pw = weight.pointer
        _ = px
        let pg = g.pointer
        var dx: Tensor? = nil, dw: Tensor? = nil, db: Tensor? = nil
        if x.requiresGrad {
            let t = Tensor(uninitialized: x.shape)
            let pd = t.pointer
            parallelFor(rowsN, grain: 16) { range in
                for r in range {
                    let gr = pg + r * n, h = ph + r * n, d = pd + r * n
                    var s1: Float = 0, s2: Float = 0
                    for j in 0..<n {
                        let gh = gr[j] * pw[j]
                        s1 += gh
                        s2 += gh * h[j]
                    }
                    s1 /= Float(n); s2 /= Float(n)
                    let inv = pis[r]
                    for j in 0..<n { d[j] = inv * (gr[j] * pw[j] - s1 - h[j] * s2) }
                }
            }
            dx = t
        }
        if weight.requiresGrad {
            let t = Tensor(zeros: weight.shape)
            let pd = t.pointer
            for r in 0..<rowsN { for j in 0..<n { pd[j] += pg[r * n + j] * ph[r * n + j] } }
            dw = t
        }
        if let bias, bias.requiresGrad { db = g.sumToShape(bias.shape) }
        return [dx, dw, db]
    }
}

/// RMSNorm over the last dimension: `x / √(mean(x²) + eps) · weight` (Llama).
public func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float) -> Tensor {
    let n = x.lastDim, rowsN = x.rows
    precondition(weight.count == n, "rmsNorm: weight \(weight.shape) vs input \(x.shape)")
    let out = Tensor(uninitialized: x.shape)
    let invRms = Tensor(uninitialized: [rowsN])
    let px = x.pointer, po = out.pointer, pw = weight.pointer, pir = invRms.pointer
    parallelFor(rowsN, grain: 16) { range in
        for r in range {
            let xr = px + r * n, o = po + r * n
            var ss: Float = 0
            for j in 0..<n { ss += xr[j] * xr[j] }
            let inv = 1 / (ss / Float(n) + eps).squareRoot()
            pir[r] = inv
            for j in 0..<n { o[j] = xr[j] * inv * pw[j] }
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
                    let inv = pir[r]
                    var dot: Float = 0
                    for j in 0..<n { dot += gr[j] * pw[j] * xr[j] }
                    let c = dot * inv * inv * inv / Float(n)
                    for j in 0..<n { d[j] = gr[j] * pw[j] * inv - xr[j] * c }
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
