#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Mean cross entropy of `logits` (`[N, classes]`) against integer `targets` (`[N]`), skipping rows whose
/// target equals `ignoreIndex`. Returns a scalar; zero when every row is ignored.
public func crossEntropy(_ logits: Tensor, targets: [Int32], ignoreIndex: Int32 = -100) -> Tensor {
    let n = logits.rows, c = logits.lastDim
    precondition(targets.count == n, "crossEntropy: \(n) rows, \(targets.count) targets")
    let probs = Tensor(zeros: [n, c])
    var total: Double = 0
    var counted = 0
    let pl = logits.pointer, pp = probs.pointer
    for r in 0..<n {
        let t = targets[r]
        if t == ignoreIndex { continue }
        precondition(t >= 0 && Int(t) < c, "crossEntropy: target \(t) outside 0..<\(c)")
        let row = pl + r * c, prow = pp + r * c
        let m = rowMax(row, c)
        prow.update(from: row, count: c)
        let s = Double(expShiftInPlace(prow, c, shift: m))
        let inv = Float(1 / s)
        for j in 0..<c { prow[j] *= inv }
        total += Double(m) + log(s) - Double(row[Int(t)])
        counted += 1
    }
    let out = Tensor(scalar: counted == 0 ? 0 : Float(total / Double(counted)))
    return Tensor.result(out, inputs: [logits]) { g in
        let d = Tensor(zeros: logits.shape)
        guard counted > 0 else { return [d] }
        let scale = g.item / Float(counted)
        let pp = probs.pointer
        let pd = d.pointer
        for r in 0..<n {
            let t = targets[r]
            if t == ignoreIndex { continue }
            for j in 0..<c { pd[r * c + j] = pp[r * c + j] * scale }
            pd[r * c + Int(t)] -= scale
        }
        return [d]
    }
}

/// Mean cross entropy of `x · weightᵀ` (an LM head) against `targets`, computed `chunkRows` rows at a time so
/// the `[rows, vocab]` logits are never held in full. Rows whose target is `ignoreIndex` cost nothing.
///
/// When `x` is tracked and `weight` is frozen (LoRA on a decoder), the gradient with respect to `x` is formed
/// chunk by chunk during the forward pass, while each chunk's logits are at hand, and backward only scales it:
/// the head costs two GEMMs, as with stored logits, and `[rows, hidden]` floats instead of `[rows, vocab]`.
/// A trainable `weight` recomputes each chunk's logits in backward instead.
///
/// `x`: `[rows, hidden]` (any leading shape flattened), `weight`: `[vocab, hidden]`, `targets`: `[rows]`.
/// `narrow`, a bfloat16 copy of a frozen `weight`, runs the head's two products in bfloat16 (see ``ComputeDType``).
public func linearCrossEntropy(
    _ x: Tensor, weight: Tensor, narrow: BFloat16Matrix? = nil, targets: [Int32], ignoreIndex: Int32 = -100,
    chunkRows: Int = 128
) -> Tensor {
    let narrow = weight.requiresGrad ? nil : narrow
    let hidden = x.lastDim, rowsN = x.rows, vocab = weight.shape[0]
    precondition(weight.shape[1] == hidden && targets.count == rowsN, "linearCrossEntropy: x \(x.shape) weight \(weight.shape) targets \(targets.count)")
    let active = (0..<rowsN).filter { targets[$0] != ignoreIndex }
    for r in active { precondition(targets[r] >= 0 && Int(targets[r]) < vocab, "linearCrossEntropy: target \(targets[r]) outside 0..<\(vocab)") }
    let chunk = max(1, chunkRows)
    let count = active.count
    let packed = Tensor(uninitialized: [chunk, hidden])
    let logits = Tensor(uninitialized: [chunk, vocab])
    // Written from parallel chunks: raw storage, never a Swift array (concurrent writes to one are a race).
    let lseStorage = Tensor(zeros: [max(count, 1)])
    let lse = lseStorage.pointer
    var total: Double = 0
    let recording = GradMode.isEnabled && (x.requiresGrad || weight.requiresGrad)
    let eagerInputGradient = recording && x.requiresGrad && !weight.requiresGrad
    // Unscaled dL/dx (Σ over a row's (softmax − onehot)·W), filled during forward when eager.
    let eagerDX: Tensor? = eagerInputGradient ? Tensor(zeros: x.shape) : nil
    let dPacked = Tensor(uninitialized: [chunk, hidden])

    func loadChunk(_ start: Int, _ n: Int) {
        for i in 0..<n {
            (packed.pointer + i * hidden).update(from: x.pointer + active[start + i] * hidden, count: hidden)
        }
        if let narrow {
            bf16Product(m: n, n: vocab, k: hidden, a: packed.pointer, b: narrow, transB: true, c: logits.pointer)
        } else {
            sgemm(transA: false, transB: true, m: n, n: vocab, k: hidden, a: packed.pointer, b: weight.pointer, c: logits.pointer)
        }
    }
    /// Turns a chunk's logits into (softmax − onehot)·scale in place.
    func logitGradient(_ start: Int, _ n: Int, scale: Float) {
        parallelFor(n, grain: 8) { range in
            for i in range {
                let row = logits.pointer + i * vocab
                _ = expShiftInPlace(row, vocab, shift: lse[start + i])
                for j in 0..<vocab { row[j] *= scale }
                row[Int(targets[active[start + i]])] -= scale
            }
        }
    }
    /// dx rows += dlogits · W for a chunk.
    func scatterInputGradient(_ start: Int, _ n: Int, into dx: Tensor) {
        if let narrow {
            bf16Product(m: n, n: hidden, k: vocab, a: logits.pointer, b: narrow, transB: false, c: dPacked.pointer)
        } else {
            sgemm(transA: false, transB: false, m: n, n: hidden, k: vocab, a: logits.pointer, b: weight.pointer, c: dPacked.pointer)
        }
        for i in 0..<n {
            let dst = dx.pointer + active[start + i] * hidden, src = dPacked.pointer + i * hidden
            for j in 0..<hidden { dst[j] += src[j] }
        }
    }

    var start = 0
    while start < count {
        let n = min(chunk, count - start)
        loadChunk(start, n)
        let partial = UnsafeMutablePointer<Double>.allocate(capacity: n)
        partial.initialize(repeating: 0, count: n)
        defer { partial.deallocate() }
        parallelFor(n, grain: 8) { range in
            for i in range {
                let row = logits.pointer + i * vocab
                let m = rowMax(row, vocab)
                let l = m + Float(log(expShiftSum(row, vocab, shift: m)))
                lse[start + i] = l
                partial[i] = Double(l - row[Int(targets[active[start + i]])])
            }
        }
        for i in 0..<n { total += partial[i] }
        if let eagerDX {
            logitGradient(start, n, scale: 1)
            scatterInputGradient(start, n, into: eagerDX)
        }
        start += n
    }
    let out = Tensor(scalar: count == 0 ? 0 : Float(total / Double(count)))
    return Tensor.result(out, inputs: [x, weight]) { g in
        _ = lseStorage
        guard count > 0 else { return [x.requiresGrad ? Tensor(zeros: x.shape) : nil, weight.requiresGrad ? Tensor(zeros: weight.shape) : nil] }
        let scale = g.item / Float(count)
        if let eagerDX { return [eagerDX * scale, nil] }
        let dx: Tensor? = x.requiresGrad ? Tensor(zeros: x.shape) : nil
        let dw: Tensor? = weight.requiresGrad ? Tensor(zeros: weight.shape) : nil
        var start = 0
        while start < count {
            let n = min(chunk, count - start)
            loadChunk(start, n)
            logitGradient(start, n, scale: scale)
            if let dx { scatterInputGradient(start, n, into: dx) }
            if let dw {
                sgemm(transA: true, transB: false, m: vocab, n: hidden, k: n, a: logits.pointer, b: packed.pointer,
                      beta: 1, c: dw.pointer)
            }
            start += n
        }
        return [dx, dw]
    }
}
