import CGraftKernels

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
        let lo = range.lowerBound
        cgraft_swiglu(pg + lo, pu + lo, po + lo, Int64(range.count))
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
    let lo = range.lowerBound
    cgraft_swiglu_backward(gate + lo, up + lo, grad + lo, dGate.map { $0 + lo }, dUp.map { $0 + lo }, Int64(range.count))
}

/// `out[i] = silu(gate[i]) · up[i]` for `count` elements at raw pointers (the kernel of ``swiglu(_:_:)`` for
/// fused ops that keep their own buffers, e.g. routed MoE experts). Parallel over Graft's threads.
public func swigluForward(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, count: Int) {
    parallelFor(count, grain: 1 << 15) { range in
        let lo = range.lowerBound
        cgraft_swiglu(gate + lo, up + lo, out + lo, Int64(range.count))
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
