/// Reshape, permute, slice, concatenate and gather.

extension Tensor {
    /// The same elements with a new shape (storage shared). One dimension may be -1.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        var s = newShape
        if let i = s.firstIndex(of: -1) {
            let known = s.enumerated().filter { $0.offset != i }.map(\.element).reduce(1, *)
            s[i] = known == 0 ? 0 : count / known
        }
        precondition(Tensor.elementCount(s) == count, "reshape \(shape) -> \(newShape)")
        let out = Tensor(shape: s, storage: storage)
        let original = shape
        return Tensor.result(out, inputs: [self]) { g in [Tensor(shape: original, storage: g.storage)] }
    }

    /// Rows `range` of the first dimension as a view sharing this tensor's storage (no copy, not recorded for
    /// autograd): for inference code that works on blocks of rows in place (mixed-adapter batches).
    public func rowsView(_ range: Range<Int>) -> Tensor {
        precondition(rank >= 1 && range.lowerBound >= 0 && range.upperBound <= shape[0], "rows \(range) of \(shape)")
        let inner = shape.dropFirst().reduce(1, *)
        var s = shape
        s[0] = range.count
        return Tensor(shape: s, storage: TensorBuffer(viewing: storage, offset: range.lowerBound * inner, count: range.count * inner))
    }

    /// Dimensions reordered by `perm` (a copy): result dimension `i` is input dimension `perm[i]`.
    public func permuted(_ perm: [Int]) -> Tensor {
        precondition(perm.sorted() == Array(0..<rank), "permute \(shape) by \(perm)")
        let out = permuteCopy(self, perm)
        var inverse = [Int](repeating: 0, count: perm.count)
        for (i, p) in perm.enumerated() { inverse[p] = i }
        return Tensor.result(out, inputs: [self]) { g in [permuteCopy(g, inverse)] }
    }

    /// Swaps two dimensions (a copy).
    public func transposed(_ d0: Int, _ d1: Int) -> Tensor {
        var perm = Array(0..<rank)
        perm.swapAt(d0, d1)
        return permuted(perm)
    }

    /// Elements `range` along dimension `dim` (a copy).
    public func slice(dim: Int, _ range: Range<Int>) -> Tensor {
        precondition(dim < rank && range.lowerBound >= 0 && range.upperBound <= shape[dim], "slice \(shape) dim \(dim) \(range)")
        let outer = shape[..<dim].reduce(1, *)
        let inner = shape[(dim + 1)...].reduce(1, *)
        let full = shape[dim], len = range.count
        var outShape = shape
        outShape[dim] = len
        let out = Tensor(zeros: outShape)
        let src = pointer, dst = out.pointer
        for o in 0..<outer {
            (dst + o * len * inner).update(from: src + (o * full + range.lowerBound) * inner, count: len * inner)
        }
        let inShape = shape
        return Tensor.result(out, inputs: [self]) { g in
            let d = Tensor(zeros: inShape)
            let pg = g.pointer, pd = d.pointer
            for o in 0..<outer {
                (pd + (o * full + range.lowerBound) * inner).update(from: pg + o * len * inner, count: len * inner)
            }
            return [d]
        }
    }
}

private func permuteCopy(_ x: Tensor, _ perm: [Int]) -> Tensor {
    let n = x.rank
    let outShape = perm.map { x.shape[$0] }
    let out = Tensor(uninitialized: outShape)
    var inStrides = [Int](repeating: 1, count: n)
    for d in stride(from: n - 2, through: 0, by: -1) { inStrides[d] = inStrides[d + 1] * x.shape[d + 1] }
    let strides = perm.map { inStrides[$0] }
    let src = x.pointer, dst = out.pointer
    if n == 0 || out.count == 0 { return out }
    // Copy innermost-contiguous runs when the last dimension is unchanged.
    let innerLen = outShape[n - 1], innerStride = strides[n - 1]
    var index = [Int](repeating: 0, count: n)
    var o = 0
    let outerCount = out.count / max(innerLen, 1)
    for _ in 0..<outerCount {
        var base = 0
        for d in 0..<(n - 1) { base += index[d] * strides[d] }
        if innerStride == 1 {
            (dst + o).update(from: src + base, count: innerLen)
        } else {
            for j in 0..<innerLen { dst[o + j] = src[base + j * innerStride] }
        }
        o += innerLen
        advance(&index, in: outShape, last: n - 2)
    }
    return out
}

/// Concatenates tensors along `dim`; all other dimensions must agree.
public func concat(_ tensors: [Tensor], dim: Int) -> Tensor {
    precondition(!tensors.isEmpty, "concat of nothing")
    let first = tensors[0].shape
    let outer = first[..<dim].reduce(1, *)
    let inner = first[(dim + 1)...].reduce(1, *)
    var outShape = first
    outShape[dim] = tensors.reduce(0) { $0 + $1.shape[dim] }
    for t in tensors {
        precondition(t.rank == first.count && Array(t.shape[..<dim]) == Array(first[..<dim])
                     && Array(t.shape[(dim + 1)...]) == Array(first[(dim + 1)...]), "concat \(first) with \(t.shape)")
    }
    let out = Tensor(zeros: outShape)
    let total = outShape[dim]
    var offset = 0
    for t in tensors {
        let len = t.shape[dim]
        for o in 0..<outer {
            (out.pointer + (o * total + offset) * inner).update(from: t.pointer + o * len * inner, count: len * inner)
        }
        offset += len
    }
    // Shapes only: the gradient of a concatenation is a split.
    let parts = tensors.map { (shape: $0.shape, tracked: $0.requiresGrad) }
    return Tensor.result(out, inputs: tensors) { g in
        var grads: [Tensor?] = []
        var off = 0
        for t in parts {
            let len = t.shape[dim]
            if t.tracked {
                let d = Tensor(zeros: t.shape)
                for o in 0..<outer {
                    (d.pointer + o * len * inner).update(from: g.pointer + (o * total + off) * inner, count: len * inner)
                }
                grads.append(d)
            } else {
                grads.append(nil)
            }
            off += len
        }
        return grads
    }
}

/// Gathers rows of `table` (`[vocab, dim]`) for each id: the embedding lookup. Result `[ids.count, dim]`.
///
/// Ids must already be validated against `vocab` (model entry points do that and throw).
public func embedding(_ ids: [Int32], table: Tensor) -> Tensor {
    let dim = table.shape[1], vocab = table.shape[0]
    let out = Tensor(uninitialized: [ids.count, dim])
    for (i, id) in ids.enumerated() {
        precondition(id >= 0 && Int(id) < vocab, "embedding: id \(id) outside 0..<\(vocab)")
        (out.pointer + i * dim).update(from: table.pointer + Int(id) * dim, count: dim)
    }
    return Tensor.result(out, inputs: [table]) { g in
        let d = Tensor(zeros: table.shape)
        for (i, id) in ids.enumerated() {
            let dst = d.pointer + Int(id) * dim, src = g.pointer + i * dim
            for j in 0..<dim { dst[j] += src[j] }
        }
        return [d]
    }
}

/// The Kronecker product of two matrices: `a` `[p, q]` ⊗ `b` `[r, s]` is `[p·r, q·s]` with
/// `out[i·r + k, j·s + l] = a[i, j] · b[k, l]`.
public func kron(_ a: Tensor, _ b: Tensor) -> Tensor {
    precondition(a.rank == 2 && b.rank == 2, "kron: matrices expected, got \(a.shape) and \(b.shape)")
    let (p, q, r, s) = (a.shape[0], a.shape[1], b.shape[0], b.shape[1])
    let out = Tensor(uninitialized: [p * r, q * s])
    let pa = a.pointer, pb = b.pointer, po = out.pointer
    let cols = q * s
    for i in 0..<p { for k in 0..<r {
        let row = po + (i * r + k) * cols
        for j in 0..<q {
            let av = pa[i * q + j]
            for l in 0..<s { row[j * s + l] = av * pb[k * s + l] }
        }
    } }
    return Tensor.result(out, inputs: [a, b]) { g in
        let pg = g.pointer
        var da: Tensor? = nil, db: Tensor? = nil
        if a.requiresGrad {
            let t = Tensor(zeros: a.shape)
            for i in 0..<p { for j in 0..<q {
                var acc: Float = 0
                for k in 0..<r { for l in 0..<s { acc += pg[(i * r + k) * cols + j * s + l] * pb[k * s + l] } }
                t.pointer[i * q + j] = acc
            } }
            da = t
        }
        if b.requiresGrad {
            let t = Tensor(zeros: b.shape)
            for i in 0..<p { for j in 0..<q {
                let av = pa[i * q + j]
                for k in 0..<r { for l in 0..<s { t.pointer[k * s + l] += pg[(i * r + k) * cols + j * s + l] * av } }
            } }
            db = t
        }
        return [da, db]
    }
}

/// A dense `[rows, cols]` matrix holding `values[i]` at `(rowIndex[i], colIndex[i])` and zeros elsewhere
/// (duplicates add). Indices must already be validated against the shape.
public func denseFromSparse(_ values: Tensor, rowIndex: [Int32], colIndex: [Int32], rows: Int, cols: Int) -> Tensor {
    precondition(values.count == rowIndex.count && values.count == colIndex.count, "denseFromSparse: index counts")
    let out = Tensor(zeros: [rows, cols])
    for i in 0..<values.count { out.pointer[Int(rowIndex[i]) * cols + Int(colIndex[i])] += values.pointer[i] }
    return Tensor.result(out, inputs: [values]) { g in
        let d = Tensor(uninitialized: values.shape)
        for i in 0..<values.count { d.pointer[i] = g.pointer[Int(rowIndex[i]) * cols + Int(colIndex[i])] }
        return [d]
    }
}
