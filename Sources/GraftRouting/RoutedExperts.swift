import GraftTensor

/// Copies rows `rows` of the `[*, width]` matrix at `src` into `dst` (`[rows.count, width]`).
@inline(__always)
func gatherRows(_ src: UnsafePointer<Float>, _ rows: [Int32], width: Int, into dst: UnsafeMutablePointer<Float>) {
    for (i, r) in rows.enumerated() { (dst + i * width).update(from: src + Int(r) * width, count: width) }
}

/// Adds the rows of `src` (`[rows.count, width]`) into rows `rows` of `dst`.
@inline(__always)
func scatterAddRows(_ src: UnsafePointer<Float>, _ rows: [Int32], width: Int, into dst: UnsafeMutablePointer<Float>) {
    for (i, r) in rows.enumerated() {
        let d = dst + Int(r) * width, s = src + i * width
        for j in 0..<width { d[j] += s[j] }
    }
}

/// The routed LoRA-expert update `Δ[t] = Σₑ s · G[t, e] · Bₑ Aₑ x[t]`, summed over the (token, expert) pairs
/// that `rows` dispatches, recorded for autograd with respect to `x`, `a`, `b` and `gates`.
///
/// Shapes: `x` `[T, in]`, `a` `[E, r, in]`, `b` `[E, out, r]`, `gates` `[T, E]`; result `[T, out]`. Each
/// expert gathers its rows and runs its two GEMMs on them only (`rows[e] == nil`: all rows, no gather), so
/// top-k routing costs `k/E` of a dense pass per expert. Backward does the same per expert: five GEMMs on the
/// gathered rows (gate gradient, ∂B, ∂A, ∂x).
public func routedLoRAExperts(_ x: Tensor, a: Tensor, b: Tensor, gates: Tensor, rows: [[Int32]?], scaling s: Float) -> Tensor {
    let tokens = x.rows, inF = x.lastDim
    let experts = a.shape[0], r = a.shape[1], outF = b.shape[1]
    let out = Tensor(zeros: [tokens, outF])
    let px = x.pointer, pa = a.pointer, pb = b.pointer, pg = gates.pointer, po = out.pointer
    // Per expert: the hidden activations H = X Aᵀ of its rows (kept for backward).
    var hidden: [UnsafeMutableBufferPointer<Float>] = []
    hidden.reserveCapacity(experts)
    for e in 0..<experts {
        let n = rows[e]?.count ?? tokens
        let h = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(n * r, 1))
        h.initialize(repeating: 0)
        hidden.append(h)
        guard n > 0, let hp = h.baseAddress else { continue }
        let ae = pa + e * r * inF, be = pb + e * outF * r
        let scaled = UnsafeMutablePointer<Float>.allocate(capacity: n * r)
        defer { scaled.deallocate() }
        if let idx = rows[e] {
            let xe = UnsafeMutablePointer<Float>.allocate(capacity: n * inF)
            defer { xe.deallocate() }
            gatherRows(px, idx, width: inF, into: xe)
            sgemm(transA: false, transB: true, m: n, n: r, k: inF, a: xe, b: ae, c: hp)
            for (i, t) in idx.enumerated() {
                let g = s * pg[Int(t) * experts + e]
                for j in 0..<r { scaled[i * r + j] = g * hp[i * r + j] }
            }
            let oe = UnsafeMutablePointer<Float>.allocate(capacity: n * outF)
            defer { oe.deallocate() }
            sgemm(transA: false, transB: true, m: n, n: outF, k: r, a: scaled, b: be, c: oe)
            scatterAddRows(oe, idx, width: outF, into: po)
        } else {
            sgemm(transA: false, transB: true, m: n, n: r, k: inF, a: px, b: ae, c: hp)
            for t in 0..<n {
                let g = s * pg[t * experts + e]
                for j in 0..<r { scaled[t * r + j] = g * hp[t * r + j] }
            }
            sgemm(transA: false, transB: true, m: n, n: outF, k: r, a: scaled, b: be, beta: 1, c: po)
        }
    }
    guard GradMode.isEnabled, x.requiresGrad || a.requiresGrad || b.requiresGrad || gates.requiresGrad else {
        for h in hidden { h.deallocate() }
        return out
    }
    let keep = HiddenBuffers(hidden)
    return Tensor.recordingCustomOp(out, inputs: [x, a, b, gates]) { dOut in
        let dx = x.requiresGrad ? Tensor(zeros: x.shape) : nil
        let da = Tensor(zeros: a.shape), db = Tensor(zeros: b.shape), dg = Tensor(zeros: gates.shape)
        let pd = dOut.pointer
        for e in 0..<experts {
            let n = rows[e]?.count ?? tokens
            guard n > 0, let hp = keep.buffers[e].baseAddress else { continue }
            let ae = pa + e * r * inF, be = pb + e * outF * r
            let idx = rows[e]
            // Gathered inputs and output gradients of this expert's rows (the full matrices for soft routing).
            var xe = px, dy = UnsafePointer(pd)
            var owned: [UnsafeMutablePointer<Float>] = []
            defer { for p in owned { p.deallocate() } }
            if let idx {
                let gx = UnsafeMutablePointer<Float>.allocate(capacity: n * inF)
                let gy = UnsafeMutablePointer<Float>.allocate(capacity: n * outF)
                owned += [gx, gy]
                gatherRows(px, idx, width: inF, into: gx)
                gatherRows(pd, idx, width: outF, into: gy)
                xe = gx
                dy = UnsafePointer(gy)
            }
            // P = dY Bₑ [n, r]: ∂G[t, e] = s ⟨P_t, H_t⟩, ∂H = s g P.
            let p = UnsafeMutablePointer<Float>.allocate(capacity: n * r)
            let hs = UnsafeMutablePointer<Float>.allocate(capacity: n * r)
            owned += [p, hs]
            sgemm(transA: false, transB: false, m: n, n: r, k: outF, a: dy, b: be, c: p)
            for i in 0..<n {
                let t = idx.map { Int($0[i]) } ?? i
                let g = s * pg[t * experts + e]
                var dot: Float = 0
                for j in 0..<r {
                    dot += p[i * r + j] * hp[i * r + j]
                    hs[i * r + j] = g * hp[i * r + j]
                    p[i * r + j] *= g
                }
                dg.pointer[t * experts + e] = s * dot
            }
            // ∂Bₑ = dYᵀ (s g H) [out, r]; ∂Aₑ = (∂H)ᵀ X [r, in]; ∂X = ∂H Aₑ.
            sgemm(transA: true, transB: false, m: outF, n: r, k: n, a: dy, b: hs, c: db.pointer + e * outF * r)
            sgemm(transA: true, transB: false, m: r, n: inF, k: n, a: p, b: xe, c: da.pointer + e * r * inF)
            if let dx {
                if let idx {
                    let t = UnsafeMutablePointer<Float>.allocate(capacity: n * inF)
                    owned.append(t)
                    sgemm(transA: false, transB: false, m: n, n: inF, k: r, a: p, b: ae, c: t)
                    scatterAddRows(t, idx, width: inF, into: dx.pointer)
                } else {
                    sgemm(transA: false, transB: false, m: n, n: inF, k: r, a: p, b: ae, beta: 1, c: dx.pointer)
                }
            }
        }
        return [dx, a.requiresGrad ? da : nil, b.requiresGrad ? db : nil, gates.requiresGrad ? dg : nil]
    }
}

/// Owns the per-expert hidden activations a recorded ``routedLoRAExperts`` keeps for its backward.
final class HiddenBuffers: @unchecked Sendable {
    let buffers: [UnsafeMutableBufferPointer<Float>]
    init(_ buffers: [UnsafeMutableBufferPointer<Float>]) { self.buffers = buffers }
    deinit { for b in buffers { b.deallocate() } }
}
