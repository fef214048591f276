/// SwiGLU, `silu(gate) · up` elementwise (the gated MLP of Llama), as one op.
///
/// The result equals `silu(gate) * up` bit for bit, and so do both gradients; the difference is memory: the
/// two-op form keeps `gate`, `silu(gate)` and `up` for backward, this op keeps `gate` and `up` and recomputes the
/// sigmoid in backward. `gate` and `up` must have the same shape (else the two-op form runs).
public func swiglu(_ gate: Tensor, _ up: Tensor) -> Tensor {
    guard gate.shape == up.shape else { return silu(gate) * up }
    let out = Tensor(uninitialized: gate.shape)
    let pg = gate.pointer, pu = up.pointer, po = out.pointer
    parallelFor(gate.count, grain: 1 << 15) { range in
        simdMap2(pg, pu, po, range) { v, w in (v / (splat(1) + vexp(-v))) * w }
    }
    let gateTracked = gate.requiresGrad, upTracked = up.requiresGrad
    return Tensor.result(out, inputs: [gate, up]) { g in
        let dGate: Tensor? = gateTracked ? Tensor(uninitialized: gate.shape) : nil
        let dUp: Tensor? = upTracked ? Tensor(uninitialized: gate.shape) : nil
        let pg = gate.pointer, pu = up.pointer, pd = g.pointer
        let pdg = dGate?.pointer, pdu = dUp?.pointer
        parallelFor(gate.count, grain: 1 << 15) { range in
            swigluBackward(gate: pg, up: pu, grad: pd, dGate: pdg, dUp: pdu, range: range)
        }
        return [dGate, dUp]
    }
}

/// One range of SwiGLU's backward: `dUp = g · silu(gate)`, `dGate = (g · up) · σ · (1 + gate · (1 − σ))`, in the
/// order the separate `mul` and `silu` backward passes compute them.
@inline(__always)
private func swigluBackward(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, grad: UnsafePointer<Float>,
                            dGate: UnsafeMutablePointer<Float>?, dUp: UnsafeMutablePointer<Float>?, range: Range<Int>) {
    @inline(__always) func lanes(_ i: Int, _ n: Int) {
        var v = splat(0), w = splat(0), gv = splat(0)
        if n == 16 {
            v = UnsafeRawPointer(gate + i).loadUnaligned(as: Float16x.self)
            w = UnsafeRawPointer(up + i).loadUnaligned(as: Float16x.self)
            gv = UnsafeRawPointer(grad + i).loadUnaligned(as: Float16x.self)
        } else {
            for j in 0..<n { v[j] = gate[i + j]; w[j] = up[i + j]; gv[j] = grad[i + j] }
        }
        var dg = splat(0), du = splat(0)
        if dUp != nil { du = gv * (v / (splat(1) + vexp(-v))) }
        if dGate != nil {
            let s = splat(1) / (splat(1) + vexp(-v))
            dg = (gv * w) * s * (splat(1) + v * (splat(1) - s))
        }
        if n == 16 {
            if let dGate { UnsafeMutableRawPointer(dGate + i).storeBytes(of: dg, as: Float16x.self) }
            if let dUp { UnsafeMutableRawPointer(dUp + i).storeBytes(of: du, as: Float16x.self) }
        } else {
            for j in 0..<n {
                dGate?[i + j] = dg[j]
                dUp?[i + j] = du[j]
            }
        }
    }
    var i = range.lowerBound
    while i + 16 <= range.upperBound {
        lanes(i, 16)
        i += 16
    }
    if i < range.upperBound { lanes(i, range.upperBound - i) }
}

/// `out[i] = silu(gate[i]) · up[i]` for `count` elements at raw pointers (the kernel of ``swiglu(_:_:)`` for
/// fused ops that keep their own buffers, e.g. routed MoE experts). Parallel over Graft's threads.
public func swigluForward(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, count: Int) {
    parallelFor(count, grain: 1 << 15) { range in
        simdMap2(gate, up, out, range) { v, w in (v / (splat(1) + vexp(-v))) * w }
    }
}

/// The gradients of ``swigluForward(gate:up:out:count:)`` for `count` elements: `dGate`, `dUp` (either may be nil)
/// from the output gradient `grad`, with the same arithmetic as ``swiglu(_:_:)``'s backward.
public func swigluBackward(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, grad: UnsafePointer<Float>,
                           dGate: UnsafeMutablePointer<Float>?, dUp: UnsafeMutablePointer<Float>?, count: Int) {
    parallelFor(count, grain: 1 << 15) { range in
        swigluBackward(gate: gate, up: up, grad: grad, dGate: dGate, dUp: dUp, range: range)
    }
}
