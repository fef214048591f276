import GraftTensor

/// The routed SwiGLU experts of an MoE feed-forward block:
/// `y[t] = Σ_{e ∋ t} w[t, e] · down_e (silu(gate_e x[t]) ⊙ up_e x[t])`, summed over the experts `rows` dispatches
/// token `t` to, recorded for autograd with respect to `x`, the expert weights and `weights`.
///
/// Shapes: `x` `[T, hidden]`, `gate` and `up` `[E, m, hidden]`, `down` `[E, hidden, m]`, `weights` `[T, E]` or nil
/// (every dispatched expert counts once, as in MoEfication, where the experts' sum is the dense FFN). Each expert
/// gathers its tokens and runs its three GEMMs on them only (`rows[e] == nil`: all tokens, no gather), the
/// DynaMoE-style dispatch; backward does the same per expert on the saved gate and up activations.
///
/// `sizes` makes the experts heterogeneous (HMoE): expert `e` uses only its first `sizes[e]` neurons (rows of its
/// `gate`/`up` slices, columns of its `down` slice), so a small expert costs what its size says; the rest of its
/// slice is padding that neither reads nor receives gradient. nil: every expert uses all `m`.
public func routedSwiGLUExperts(_ x: Tensor, gate: Tensor, up: Tensor, down: Tensor, weights: Tensor?,
                                rows: [[Int32]?], sizes: [Int]? = nil) -> Tensor {
    let tokens = x.rows, hidden = x.lastDim
    let experts = gate.shape[0], m = gate.shape[1]
    let out = Tensor(zeros: [tokens, hidden])
    let px = x.pointer, pgw = gate.pointer, puw = up.pointer, pdw = down.pointer, po = out.pointer
    let pw = weights?.pointer
    // Per expert: the gate and up activations of its tokens, `[n, m]` each, kept for backward.
    var saved: [UnsafeMutableBufferPointer<Float>] = []
    saved.reserveCapacity(2 * experts)
    let act = UnsafeMutablePointer<Float>.allocate(capacity: max(tokens * m, 1))
    let xe = UnsafeMutablePointer<Float>.allocate(capacity: max(tokens * hidden, 1))
    let ye = UnsafeMutablePointer<Float>.allocate(capacity: max(tokens * hidden, 1))
    defer { act.deallocate(); xe.deallocate(); ye.deallocate() }
    for e in 0..<experts {
        let n = rows[e]?.count ?? tokens, me = sizes?[e] ?? m
        let g = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(n * me, 1))
        let u = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(n * me, 1))
        saved += [g, u]
        guard n > 0, let gp = g.baseAddress, let ub = u.baseAddress else { continue }
        let idx = rows[e]
        var input = UnsafePointer(px)
        if let idx {
            gatherRows(px, idx, width: hidden, into: xe)
            input = UnsafePointer(xe)
        }
        let ge = pgw + e * m * hidden, ue = puw + e * m * hidden, de = pdw + e * hidden * m
        sgemm(transA: false, transB: true, m: n, n: me, k: hidden, a: input, b: ge, c: gp)
        sgemm(transA: false, transB: true, m: n, n: me, k: hidden, a: input, b: ue, c: ub)
        swigluForward(gate: gp, up: ub, out: act, count: n * me)
        if let pw {
            // Scale each token's activations by its weight: down is linear, so this scales its output.
            for i in 0..<n {
                let t = idx.map { Int($0[i]) } ?? i
                scaleRow(act + i * me, by: pw[t * experts + e], count: me)
            }
        }
        if let idx {
            sgemm(transA: false, transB: true, m: n, n: hidden, k: me, a: act, b: de, ldb: m, c: ye)
            scatterAddRows(ye, idx, width: hidden, into: po)
        } else {
            sgemm(transA: false, transB: true, m: n, n: hidden, k: me, a: act, b: de, ldb: m, beta: 1, c: po)
        }
    }
    let tracked = x.requiresGrad || gate.requiresGrad || up.requiresGrad || down.requiresGrad || (weights?.requiresGrad ?? false)
    guard GradMode.isEnabled, tracked else {
        for b in saved { b.deallocate() }
        return out
    }
    let keep = HiddenBuffers(saved)
    var inputs = [x, gate, up, down]
    if let weights { inputs.append(weights) }
    return Tensor.recordingCustomOp(out, inputs: inputs) { dOut in
        let dx = x.requiresGrad ? Tensor(zeros: x.shape) : nil
        let dGateW = gate.requiresGrad ? Tensor(zeros: gate.shape) : nil
        let dUpW = up.requiresGrad ? Tensor(zeros: up.shape) : nil
        let dDownW = down.requiresGrad ? Tensor(zeros: down.shape) : nil
        let dWeights = weights.map { $0.requiresGrad ? Tensor(zeros: $0.shape) : nil } ?? nil
        let pd = dOut.pointer
        let cap = max(tokens * max(m, hidden), 1)
        let gx = UnsafeMutablePointer<Float>.allocate(capacity: cap), gy = UnsafeMutablePointer<Float>.allocate(capacity: cap)
        let dA = UnsafeMutablePointer<Float>.allocate(capacity: cap), a = UnsafeMutablePointer<Float>.allocate(capacity: cap)
        let dG = UnsafeMutablePointer<Float>.allocate(capacity: cap), dU = UnsafeMutablePointer<Float>.allocate(capacity: cap)
        let tmp = UnsafeMutablePointer<Float>.allocate(capacity: cap)
        defer { for p in [gx, gy, dA, a, dG, dU, tmp] { p.deallocate() } }
        for e in 0..<experts {
            let n = rows[e]?.count ?? tokens, me = sizes?[e] ?? m
            guard n > 0, let gp = keep.buffers[2 * e].baseAddress, let upp = keep.buffers[2 * e + 1].baseAddress else { continue }
            let idx = rows[e]
            var xin = UnsafePointer(px), dy = UnsafePointer(pd)
            if let idx {
                gatherRows(px, idx, width: hidden, into: gx)
                gatherRows(pd, idx, width: hidden, into: gy)
                xin = UnsafePointer(gx)
                dy = UnsafePointer(gy)
            }
            let ge = pgw + e * m * hidden, ue = puw + e * m * hidden, de = pdw + e * hidden * m
            // dA = dY down_e [n, me] (before the token weight); A = silu(G) ⊙ U.
            sgemm(transA: false, transB: false, m: n, n: me, k: hidden, a: dy, b: de, ldb: m, c: dA)
            swigluForward(gate: gp, up: upp, out: a, count: n * me)
            if let pw {
                for i in 0..<n {
                    let t = idx.map { Int($0[i]) } ?? i
                    let w = pw[t * experts + e]
                    if let dWeights { dWeights.pointer[t * experts + e] = rowDot(dA + i * me, a + i * me, count: me) }
                    scaleRow(dA + i * me, by: w, count: me)
                    scaleRow(a + i * me, by: w, count: me)
                }
            }
            // ∂down_e = dYᵀ (w A) [hidden, me], the first me columns of the [hidden, m] slice.
            if let dDownW {
                sgemm(transA: true, transB: false, m: hidden, n: me, k: n, a: dy, b: a, beta: 1,
                      c: dDownW.pointer + e * hidden * m, ldc: m)
            }
            swigluBackward(gate: gp, up: upp, grad: dA, dGate: dG, dUp: dU, count: n * me)
            // ∂gate_e = dGᵀ X, ∂up_e = dUᵀ X [me, hidden]; ∂X = dG gate_e + dU up_e.
            if let dGateW { sgemm(transA: true, transB: false, m: me, n: hidden, k: n, a: dG, b: xin, beta: 1, c: dGateW.pointer + e * m * hidden) }
            if let dUpW { sgemm(transA: true, transB: false, m: me, n: hidden, k: n, a: dU, b: xin, beta: 1, c: dUpW.pointer + e * m * hidden) }
            if let dx {
                if let idx {
                    sgemm(transA: false, transB: false, m: n, n: hidden, k: me, a: dG, b: ge, c: tmp)
                    sgemm(transA: false, transB: false, m: n, n: hidden, k: me, a: dU, b: ue, beta: 1, c: tmp)
                    scatterAddRows(tmp, idx, width: hidden, into: dx.pointer)
                } else {
                    sgemm(transA: false, transB: false, m: n, n: hidden, k: me, a: dG, b: ge, beta: 1, c: dx.pointer)
                    sgemm(transA: false, transB: false, m: n, n: hidden, k: me, a: dU, b: ue, beta: 1, c: dx.pointer)
                }
            }
        }
        var grads: [Tensor?] = [dx, dGateW, dUpW, dDownW]
        if weights != nil { grads.append(dWeights) }
        return grads
    }
}

/// Multiplies `count` floats at `p` by `s` in place.
@inline(__always)
func scaleRow(_ p: UnsafeMutablePointer<Float>, by s: Float, count: Int) {
    var j = 0
    let v = Float16x(repeating: s)
    while j + 16 <= count {
        let r = UnsafeMutableRawPointer(p + j)
        r.storeBytes(of: r.loadUnaligned(as: Float16x.self) * v, as: Float16x.self)
        j += 16
    }
    while j < count { p[j] *= s; j += 1 }
}

/// `Σ a[j] · b[j]` over `count` floats.
@inline(__always)
func rowDot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) -> Float {
    var acc = Float16x(repeating: 0)
    var j = 0
    while j + 16 <= count {
        acc += UnsafeRawPointer(a + j).loadUnaligned(as: Float16x.self) * UnsafeRawPointer(b + j).loadUnaligned(as: Float16x.self)
        j += 16
    }
    var s = acc.sum()
    while j < count { s += a[j] * b[j]; j += 1 }
    return s
}
