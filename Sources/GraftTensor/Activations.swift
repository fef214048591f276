import CGraftKernels
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Elementwise `f` over `x`, 16 lanes at a time, in parallel chunks for large tensors.
@inline(__always)
func mapElements(_ x: Tensor, _ f: (Float16x) -> Float16x) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, po = out.pointer
    parallelFor(x.count, grain: 1 << 15) { range in simdMap(px, po, range, f) }
    return out
}

/// `g · f'(x)` elementwise; `df` receives `(x, g)`.
@inline(__always)
func mapGradient(_ x: Tensor, _ g: Tensor, _ df: (Float16x, Float16x) -> Float16x) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, pg = g.pointer, po = out.pointer
    parallelFor(x.count, grain: 1 << 15) { range in simdMap2(px, pg, po, range, df) }
    return out
}

/// `kernel(x, out, n)` over `x` in parallel chunks: a CGraftKernels activation.
@inline(__always)
func mapElements(_ x: Tensor, kernel: (UnsafePointer<Float>?, UnsafeMutablePointer<Float>?, Int64) -> Void) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, po = out.pointer
    parallelFor(x.count, grain: 1 << 15) { range in kernel(px + range.lowerBound, po + range.lowerBound, Int64(range.count)) }
    return out
}

/// `kernel(x, g, dx, n)` over `x` and its output gradient `g` in parallel chunks: a CGraftKernels gradient.
@inline(__always)
func mapGradient(_ x: Tensor, _ g: Tensor,
                 kernel: (UnsafePointer<Float>?, UnsafePointer<Float>?, UnsafeMutablePointer<Float>?, Int64) -> Void) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, pg = g.pointer, po = out.pointer
    parallelFor(x.count, grain: 1 << 15) { range in
        let lo = range.lowerBound
        kernel(px + lo, pg + lo, po + lo, Int64(range.count))
    }
    return out
}

/// GELU in its exact erf form, `x/2 · (1 + erf(x/√2))` (BERT's "gelu"); `cgraft_gelu` runs it on the CPU's widest
/// vectors with the arithmetic of ``verf(_:)`` and ``vexp(_:)``.
public func gelu(_ x: Tensor) -> Tensor {
    let out = mapElements(x, kernel: cgraft_gelu)
    return Tensor.result(out, inputs: [x]) { g in [mapGradient(x, g, kernel: cgraft_gelu_backward)] }
}

/// SiLU (swish), `x · σ(x)`.
public func silu(_ x: Tensor) -> Tensor {
    let out = mapElements(x, kernel: cgraft_silu)
    return Tensor.result(out, inputs: [x]) { g in [mapGradient(x, g, kernel: cgraft_silu_backward)] }
}

/// ReLU, `max(x, 0)`.
public func relu(_ x: Tensor) -> Tensor {
    let zero = Float16x(repeating: 0)
    let out = mapElements(x) { v in v.replacing(with: zero, where: v .< zero) }
    return Tensor.result(out, inputs: [x]) { g in
        [mapGradient(x, g) { v, gv in gv.replacing(with: zero, where: v .<= zero) }]
    }
}

/// Hyperbolic tangent.
public func tanh(_ x: Tensor) -> Tensor {
    // tanh(v) = 1 − 2 / (exp(2v) + 1), stable at both ends with the clamped vexp.
    let out = mapElements(x) { v in splat(1) - splat(2) / (vexp(splat(2) * v) + splat(1)) }
    return Tensor.result(out, inputs: [x]) { g in [mapGradient(out, g) { t, gv in gv * (splat(1) - t * t) }] }
}

/// Logistic sigmoid.
public func sigmoid(_ x: Tensor) -> Tensor {
    let out = mapElements(x) { v in splat(1) / (splat(1) + vexp(-v)) }
    return Tensor.result(out, inputs: [x]) { g in [mapGradient(out, g) { s, gv in gv * s * (splat(1) - s) }] }
}

/// Elementwise scalar map for the less common functions (no vector kernel needed).
@inline(__always)
func mapScalar(_ x: Tensor, _ f: (Float) -> Float) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, po = out.pointer
    for i in 0..<x.count { po[i] = f(px[i]) }
    return out
}

/// `g · f'(x)` for a scalar derivative.
@inline(__always)
func scalarGradient(_ x: Tensor, _ g: Tensor, _ df: (Float) -> Float) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, pg = g.pointer, po = out.pointer
    for i in 0..<x.count { po[i] = pg[i] * df(px[i]) }
    return out
}

/// Elementwise square root (inputs must be positive where a gradient is taken).
public func sqrt(_ x: Tensor) -> Tensor {
    let out = mapScalar(x) { $0.squareRoot() }
    return Tensor.result(out, inputs: [x]) { g in [scalarGradient(out, g) { 0.5 / $0 }] }
}

/// Elementwise `1 / x`.
public func reciprocal(_ x: Tensor) -> Tensor {
    let out = mapScalar(x) { 1 / $0 }
    return Tensor.result(out, inputs: [x]) { g in [scalarGradient(x, g) { -1 / ($0 * $0) }] }
}

/// Elementwise cosine.
public func cos(_ x: Tensor) -> Tensor {
    let out = mapScalar(x) { cosf($0) }
    return Tensor.result(out, inputs: [x]) { g in [scalarGradient(x, g) { -sinf($0) }] }
}

/// Elementwise sine.
public func sin(_ x: Tensor) -> Tensor {
    let out = mapScalar(x) { sinf($0) }
    return Tensor.result(out, inputs: [x]) { g in [scalarGradient(x, g) { cosf($0) }] }
}
