/// Elementwise arithmetic with NumPy broadcasting, and the reductions gradients of broadcasts need.

/// How `b` broadcasts against `a` for the fast paths.
enum BroadcastKind {
    case same
    /// `b` repeats along the leading dimensions of `a` (b's shape is a suffix of a's, e.g. a bias).
    case suffix(inner: Int)
    /// `b` is a single element.
    case scalar
    /// Anything else: index arithmetic per element.
    case general(outShape: [Int])
}

/// The broadcast result shape of two shapes, or nil when they are incompatible.
public func broadcastShape(_ a: [Int], _ b: [Int]) -> [Int]? {
    let n = max(a.count, b.count)
    var out = [Int](repeating: 1, count: n)
    for i in 0..<n {
        let da = i < n - a.count ? 1 : a[i - (n - a.count)]
        let db = i < n - b.count ? 1 : b[i - (n - b.count)]
        if da == db || db == 1 { out[i] = da } else if da == 1 { out[i] = db } else { return nil }
    }
    return out
}

private func classify(_ a: [Int], _ b: [Int]) -> BroadcastKind {
    if a == b { return .same }
    let bCount = Tensor.elementCount(b)
    if bCount == 1 && Tensor.elementCount(a) >= 1 && b.count <= a.count { return .scalar }
    if b.count <= a.count, Array(a.suffix(b.count)) == b { return .suffix(inner: bCount) }
    guard let out = broadcastShape(a, b) else {
        preconditionFailure("shapes \(a) and \(b) do not broadcast")
    }
    return .general(outShape: out)
}

/// Advances a row-major multi-index over `shape` (dimensions `0...last`) by one; false after the last index.
@inline(__always)
@discardableResult
func advance(_ index: inout [Int], in shape: [Int], last: Int) -> Bool {
    var d = last
    while d >= 0 {
        index[d] += 1
        if index[d] < shape[d] { return true }
        index[d] = 0
        d -= 1
    }
    return false
}

/// Strides of `shape` aligned to `outShape` (0 along broadcast dimensions).
private func broadcastStrides(_ shape: [Int], to outShape: [Int]) -> [Int] {
    var strides = [Int](repeating: 0, count: outShape.count)
    var s = 1
    for i in stride(from: shape.count - 1, through: 0, by: -1) {
        let oi = i + outShape.count - shape.count
        strides[oi] = shape[i] == 1 ? 0 : s
        s *= shape[i]
    }
    return strides
}

private func generalBinary(
    _ a: Tensor, _ b: Tensor, outShape: [Int], _ f: (Float, Float) -> Float
) -> Tensor {
    let out = Tensor(zeros: outShape)
    let sa = broadcastStrides(a.shape, to: outShape)
    let sb = broadcastStrides(b.shape, to: outShape)
    let n = outShape.count
    var index = [Int](repeating: 0, count: n)
    let pa = a.pointer, pb = b.pointer, po = out.pointer
    for o in 0..<out.count {
        var ia = 0, ib = 0
        for d in 0..<n { ia += index[d] * sa[d]; ib += index[d] * sb[d] }
        po[o] = f(pa[ia], pb[ib])
        advance(&index, in: outShape, last: n - 1)
    }
    return out
}

extension Tensor {
    /// Sums this tensor down to `shape` (the inverse of broadcasting `shape` up to `self.shape`).
    public func sumToShape(_ target: [Int]) -> Tensor {
        if target == shape { return self }
        let targetCount = Tensor.elementCount(target)
        let out = Tensor(zeros: target)
        if targetCount == 1 {
            out.pointer[0] = sumAll()
            return out
        }
        if target.count <= shape.count, Array(shape.suffix(target.count)) == target {
            let rowsN = count / targetCount
            let po = out.pointer
            for r in 0..<rowsN {
                let src = pointer + r * targetCount
                for j in 0..<targetCount { po[j] += src[j] }
            }
            return out
        }
        let st = broadcastStrides(target, to: shape)
        let n = shape.count
        var index = [Int](repeating: 0, count: n)
        let p = pointer, po = out.pointer
        for o in 0..<count {
            var it = 0
            for d in 0..<n { it += index[d] * st[d] }
            po[it] += p[o]
            advance(&index, in: shape, last: n - 1)
        }
        return out
    }

    /// Sum of all elements (accumulated in Double).
    public func sumAll() -> Float {
        var s: Double = 0
        let p = pointer
        for i in 0..<count { s += Double(p[i]) }
        return Float(s)
    }

    /// In-place `self += other` (same shape); used for gradient accumulation. Not recorded.
    public func addInPlace(_ other: Tensor) {
        precondition(other.count == count, "addInPlace: \(shape) vs \(other.shape)")
        let p = pointer, q = other.pointer
        parallelFor(count, grain: 1 << 16) { range in simdMap2(p, q, p, range) { $0 + $1 } }
    }

    /// In-place `self *= s`. Not recorded.
    public func scaleInPlace(_ s: Float) {
        let p = pointer
        for i in 0..<count { p[i] *= s }
    }

    /// `self + other` without recording (same shape).
    func adding(_ other: Tensor) -> Tensor {
        let out = Tensor(uninitialized: shape)
        let p = pointer, q = other.pointer, o = out.pointer
        parallelFor(count, grain: 1 << 16) { range in simdMap2(p, q, o, range) { $0 + $1 } }
        return out
    }
}

@inline(__always)
private func binaryKernel(_ a: Tensor, _ b: Tensor, _ f: @escaping (Float16x, Float16x) -> Float16x,
                          _ scalarF: @escaping (Float, Float) -> Float) -> Tensor {
    switch classify(a.shape, b.shape) {
    case .same:
        let out = Tensor(uninitialized: a.shape)
        let pa = a.pointer, pb = b.pointer, po = out.pointer
        parallelFor(a.count, grain: 1 << 16) { range in simdMap2(pa, pb, po, range, f) }
        return out
    case .scalar:
        let out = Tensor(uninitialized: a.shape)
        let pa = a.pointer, s = splat(b.pointer[0]), po = out.pointer
        parallelFor(a.count, grain: 1 << 16) { range in simdMap(pa, po, range) { f($0, s) } }
        return out
    case .suffix(let inner):
        let out = Tensor(uninitialized: a.shape)
        let pa = a.pointer, pb = b.pointer, po = out.pointer
        let rowsN = inner == 0 ? 0 : a.count / inner
        parallelFor(rowsN, grain: max(1, (1 << 16) / max(inner, 1))) { range in
            for r in range {
                let base = r * inner
                var j = 0
                while j + 16 <= inner {
                    let va = UnsafeRawPointer(pa + base + j).loadUnaligned(as: Float16x.self)
                    let vb = UnsafeRawPointer(pb + j).loadUnaligned(as: Float16x.self)
                    UnsafeMutableRawPointer(po + base + j).storeBytes(of: f(va, vb), as: Float16x.self)
                    j += 16
                }
                while j < inner { po[base + j] = scalarF(pa[base + j], pb[j]); j += 1 }
            }
        }
        return out
    case .general(let outShape):
        return generalBinary(a, b, outShape: outShape, scalarF)
    }
}

/// Elementwise `a + b` with broadcasting.
public func add(_ a: Tensor, _ b: Tensor) -> Tensor {
    if b.count > a.count { return add(b, a) }
    let out = binaryKernel(a, b, { $0 + $1 }, { $0 + $1 })
    // Shapes only: the backward of a sum needs neither operand.
    let aShape: [Int]? = a.requiresGrad ? a.shape : nil, bShape: [Int]? = b.requiresGrad ? b.shape : nil
    return Tensor.result(out, inputs: [a, b]) { g in
        [aShape.map { g.sumToShape($0) }, bShape.map { g.sumToShape($0) }]
    }
}

/// Elementwise `a - b` with broadcasting.
public func sub(_ a: Tensor, _ b: Tensor) -> Tensor {
    add(a, mul(b, -1))
}

/// Elementwise `a * b` with broadcasting.
public func mul(_ a: Tensor, _ b: Tensor) -> Tensor {
    if b.count > a.count { return mul(b, a) }
    let out = binaryKernel(a, b, { $0 * $1 }, { $0 * $1 })
    // Each operand is kept only when the other one needs it for its gradient.
    let keepB: Tensor? = a.requiresGrad ? b : nil, keepA: Tensor? = b.requiresGrad ? a : nil
    let bShape = b.shape
    return Tensor.result(out, inputs: [a, b]) { g in
        [keepB.map { binaryKernel(g, $0, { $0 * $1 }, { $0 * $1 }) },
         keepA.map { binaryKernel(g, $0, { $0 * $1 }, { $0 * $1 }).sumToShape(bShape) }]
    }
}

/// `a * s` for a constant `s`.
public func mul(_ a: Tensor, _ s: Float) -> Tensor {
    let out = Tensor(uninitialized: a.shape)
    let pa = a.pointer, po = out.pointer, sv = splat(s)
    parallelFor(a.count, grain: 1 << 16) { range in simdMap(pa, po, range) { $0 * sv } }
    return Tensor.result(out, inputs: [a]) { g in [mul(g, s)] }
}

/// `a + s` for a constant `s`.
public func add(_ a: Tensor, _ s: Float) -> Tensor {
    let out = Tensor(zeros: a.shape)
    let pa = a.pointer, po = out.pointer
    for i in 0..<a.count { po[i] = pa[i] + s }
    return Tensor.result(out, inputs: [a]) { g in [g] }
}

/// Sum of all elements as a scalar tensor.
public func sum(_ a: Tensor) -> Tensor {
    let out = Tensor(scalar: a.sumAll())
    return Tensor.result(out, inputs: [a]) { g in [Tensor(repeating: g.item, shape: a.shape)] }
}

/// Mean of all elements as a scalar tensor.
public func mean(_ a: Tensor) -> Tensor {
    let n = Float(max(a.count, 1))
    let out = Tensor(scalar: a.sumAll() / n)
    return Tensor.result(out, inputs: [a]) { g in [Tensor(repeating: g.item / n, shape: a.shape)] }
}

/// Operators for readability in model code.
public func + (a: Tensor, b: Tensor) -> Tensor { add(a, b) }
/// Elementwise product.
public func * (a: Tensor, b: Tensor) -> Tensor { mul(a, b) }
/// Elementwise difference.
public func - (a: Tensor, b: Tensor) -> Tensor { sub(a, b) }
/// Scaling by a constant.
public func * (a: Tensor, s: Float) -> Tensor { mul(a, s) }
