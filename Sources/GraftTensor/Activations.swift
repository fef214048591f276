#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Applies `f` elementwise, in parallel chunks for large tensors.
@inline(__always)
func mapElements(_ x: Tensor, _ f: (Float) -> Float) -> Tensor {
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    parallelFor(x.count, grain: 1 << 15) { range in
        for i in range { po[i] = f(px[i]) }
    }
    return out
}

/// `g * f'(x)` elementwise.
@inline(__always)
func mapGradient(_ x: Tensor, _ g: Tensor, _ df: (Float) -> Float) -> Tensor {
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, pg = g.pointer, po = out.pointer
    parallelFor(x.count, grain: 1 << 15) { range in
        for i in range { po[i] = pg[i] * df(px[i]) }
    }
    return out
}

/// GELU in its exact erf form, `x/2 · (1 + erf(x/√2))` (BERT's "gelu").
public func gelu(_ x: Tensor) -> Tensor {
    let invSqrt2: Float = 0.70710678118654752
    let out = mapElements(x) { v in 0.5 * v * (1 + erff(v * invSqrt2)) }
    return Tensor.result(out, inputs: [x]) { g in
        [mapGradient(x, g) { v in
            let cdf = 0.5 * (1 + erff(v * invSqrt2))
            let pdf = expf(-0.5 * v * v) * 0.3989422804014327
            return cdf + v * pdf
        }]
    }
}

/// SiLU (swish), `x · σ(x)`.
public func silu(_ x: Tensor) -> Tensor {
    let out = mapElements(x) { v in v / (1 + expf(-v)) }
    return Tensor.result(out, inputs: [x]) { g in
        [mapGradient(x, g) { v in
            let s = 1 / (1 + expf(-v))
            return s * (1 + v * (1 - s))
        }]
    }
}

/// ReLU, `max(x, 0)`.
public func relu(_ x: Tensor) -> Tensor {
    let out = mapElements(x) { v in max(v, 0) }
    return Tensor.result(out, inputs: [x]) { g in [mapGradient(x, g) { v in v > 0 ? 1 : 0 }] }
}

/// Hyperbolic tangent.
public func tanh(_ x: Tensor) -> Tensor {
    let out = mapElements(x) { v in tanhf(v) }
    return Tensor.result(out, inputs: [x]) { g in [mapGradient(out, g) { t in 1 - t * t }] }
}

/// Logistic sigmoid.
public func sigmoid(_ x: Tensor) -> Tensor {
    let out = mapElements(x) { v in 1 / (1 + expf(-v)) }
    return Tensor.result(out, inputs: [x]) { g in [mapGradient(out, g) { s in s * (1 - s) }] }
}
