/// Vectorized transcendental functions for the elementwise kernels, 16 lanes at a time.
///
/// `vexp` is a Cephes-style range reduction with a degree-6 polynomial (≤ 2 ulp on [-87, 88]);
/// `verf` is a rational approximation `x·P(x²)/Q(x²)` on [-4, 4] (≤ 3e-7 absolute), ±1 beyond.
/// Both are checked against the C library in `VectorMathTests`. Constants are spelled as full vectors and
/// clamping uses masks: the generic scalar-broadcast and `clamped` paths do not vectorize.
public typealias Float16x = SIMD16<Float>

@inline(__always)
func splat(_ v: Float) -> Float16x { Float16x(repeating: v) }

@inline(__always)
func clamp(_ x: Float16x, _ lo: Float, _ hi: Float) -> Float16x {
    var r = x
    r.replace(with: splat(lo), where: x .< splat(lo))
    r.replace(with: splat(hi), where: x .> splat(hi))
    return r
}

@inline(__always)
public func vexp(_ xIn: Float16x) -> Float16x {
    let x = clamp(xIn, -87.33, 88.72)
    // n = round(x / ln 2) via the 1.5·2²³ trick; its low mantissa bits then hold n as an integer.
    let shifted = x * splat(1.44269504088896341) + splat(12582912.0)
    let n = shifted - splat(12582912.0)
    var r = x - n * splat(0.693359375)
    r = r + n * splat(2.12194440e-4)
    let r2 = r * r
    var p = splat(1.9875691500e-4)
    p = p * r + splat(1.3981999507e-3)
    p = p * r + splat(8.3334519073e-3)
    p = p * r + splat(4.1665795894e-2)
    p = p * r + splat(1.6666665459e-1)
    p = p * r + splat(5.0000001201e-1)
    p = p * r2 + r + splat(1)
    let bits = unsafeBitCast(shifted, to: SIMD16<Int32>.self) &- SIMD16<Int32>(repeating: 0x4B40_0000)
    let scale = unsafeBitCast((bits &+ SIMD16<Int32>(repeating: 127)) &<< SIMD16<Int32>(repeating: 23), to: Float16x.self)
    // Below -87.33 the true value is subnormal: zero, not the clamp's 1.2e-38, so a masked score (-inf) gets exactly
    // no weight and nothing downstream is pushed into the subnormal range.
    return (p * scale).replacing(with: 0, where: xIn .< splat(-87.33))
}

@inline(__always)
public func verf(_ xIn: Float16x) -> Float16x {
    let x = clamp(xIn, -4, 4)
    let x2 = x * x
    var p = splat(-2.72614225801306e-10)
    p = p * x2 + splat(2.77068142495902e-08)
    p = p * x2 - splat(2.10102402082508e-06)
    p = p * x2 - splat(5.69250639462346e-05)
    p = p * x2 - splat(7.34990630326855e-04)
    p = p * x2 - splat(2.95459980854025e-03)
    p = p * x2 - splat(1.60960333262415e-02)
    var q = splat(-1.45660718464996e-05)
    q = q * x2 - splat(2.13374055278905e-04)
    q = q * x2 - splat(1.68282697438203e-03)
    q = q * x2 - splat(7.37332916720468e-03)
    q = q * x2 - splat(1.42647390514189e-02)
    return x * p / q
}

/// `Σ a[j]·b[j]` for `j < n`, 16 lanes at a time.
@inline(__always)
func dotProduct(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
    var lanes = splat(0)
    var i = 0
    while i + 16 <= n {
        lanes += UnsafeRawPointer(a + i).loadUnaligned(as: Float16x.self) * UnsafeRawPointer(b + i).loadUnaligned(as: Float16x.self)
        i += 16
    }
    var total = lanes.sum()
    while i < n {
        total += a[i] * b[i]
        i += 1
    }
    return total
}

/// Applies a 16-lane kernel over `range`, padding the tail lanes with zeros.
@inline(__always)
func simdMap(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, _ range: Range<Int>,
             _ f: (Float16x) -> Float16x) {
    var i = range.lowerBound
    let end = range.upperBound
    while i + 16 <= end {
        let v = UnsafeRawPointer(src + i).loadUnaligned(as: Float16x.self)
        UnsafeMutableRawPointer(dst + i).storeBytes(of: f(v), as: Float16x.self)
        i += 16
    }
    if i < end {
        var v = splat(0)
        for j in 0..<(end - i) { v[j] = src[i + j] }
        let r = f(v)
        for j in 0..<(end - i) { dst[i + j] = r[j] }
    }
}

/// Applies a 16-lane kernel of two inputs (e.g. `x` and its gradient).
@inline(__always)
func simdMap2(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>,
              _ range: Range<Int>, _ f: (Float16x, Float16x) -> Float16x) {
    var i = range.lowerBound
    let end = range.upperBound
    while i + 16 <= end {
        let va = UnsafeRawPointer(a + i).loadUnaligned(as: Float16x.self)
        let vb = UnsafeRawPointer(b + i).loadUnaligned(as: Float16x.self)
        UnsafeMutableRawPointer(dst + i).storeBytes(of: f(va, vb), as: Float16x.self)
        i += 16
    }
    if i < end {
        var va = splat(0), vb = splat(0)
        for j in 0..<(end - i) { va[j] = a[i + j]; vb[j] = b[i + j] }
        let r = f(va, vb)
        for j in 0..<(end - i) { dst[i + j] = r[j] }
    }
}
