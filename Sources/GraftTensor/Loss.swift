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
/// the `[rows, vocab]` logits are never held in full: forward keeps only each row's log-sum-exp, backward
/// recomputes one chunk of logits at a time. Rows whose target is `ignoreIndex` cost nothing.
///
/// `x`: `[rows, hidden]` (any leading shape flattened), `weight`: `[vocab, hidden]`, `targets`: `[rows]`.
public func linearCrossEntropy(
    _ x: Tensor, weight: Tensor, targets: [Int32], ignoreIndex: Int32 = -100, chunkRows: Int = 128
) -> Tensor {
    let hidden = x.lastDim, rowsN = x.rows, vocab = weight.shape[0]
    precondition(weight.shape[1] == hidden && targets.count == rowsN, "linearCrossEntropy: x \(x.shape) weight \(weight.shape) targets \(targets.count)")
    let active = (0..<rowsN).filter { targets[$0] != ignoreIndex }
    for r in active { precondition(targets[r] >= 0 && Int(targets[r]) < vocab, "linearCrossEntropy: target \(targets[r]) outside 0..<\(vocab)") }
    let chunk = max(1, chunkRows)
    let packed = Tensor(zeros: [chunk, hidden])
    let logits = Tensor(zeros: [chunk, vocab])
    var lse = [Float](repeating: 0, count: active.count)
    var total: Double = 0
    func loadChunk(_ start: Int, _ n: Int) {
        for i in 0..<n {
            (packed.pointer + i * hidden).update(from: x.pointer + active[start + i] * hidden, count: hidden)
        }
        sgemm(transA: false, transB: true, m: n, n: vocab, k: hidden, a: packed.pointer, b: weight.pointer, c: logits.pointer)
    }
    var start = 0
    while start < active.count {
        let n = min(chunk, active.count - start)
        loadChunk(start, n)
        for i in 0..<n {
            let row = logits.pointer + i * vocab
            let m = rowMax(row, vocab)
            let l = m + Float(log(expShiftSum(row, vocab, shift: m)))
            lse[start + i] = l
            total += Double(l - row[Int(targets[active[start + i]])])
        }
        start += n
    }
    let count = active.count
    let out = Tensor(scalar: count == 0 ? 0 : Float(total / Double(count)))
    return Tensor.result(out, inputs: [x, weight]) { g in
        guard count > 0 else { return [x.requiresGrad ? Tensor(zeros: x.shape) : nil, weight.requiresGrad ? Tensor(zeros: weight.shape) : nil] }
        let scale = g.item / Float(count)
        let dx: Tensor? = x.requiresGrad ? Tensor(zeros: x.shape) : nil
        let dw: Tensor? = weight.requiresGrad ? Tensor(zeros: weight.shape) : nil
        let dPacked = Tensor(zeros: [chunk, hidden])
        var start = 0
        while start < count {
            let n = min(chunk, count - start)
            loadChunk(start, n)
            // dlogits = (softmax − onehot) · scale, in place.
            for i in 0..<n {
                let row = logits.pointer + i * vocab
                _ = expShiftInPlace(row, vocab, shift: lse[start + i])
                for j in 0..<vocab { row[j] *= scale }
                row[Int(targets[active[start + i]])] -= scale
            }
            if let dx {
                sgemm(transA: false, transB: false, m: n, n: hidden, k: vocab, a: logits.pointer, b: weight.pointer, c: dPacked.pointer)
                for i in 0..<n {
                    let dst = dx.pointer + active[start + i] * hidden, src = dPacked.pointer + i * hidden
                    for j in 0..<hidden { dst[j] += src[j] }
                }
            }
            if let dw {
                sgemm(transA: true, transB: false, m: vocab, n: hidden, k: n, a: logits.pointer, b: packed.pointer,
                      beta: 1, c: dw.pointer)
            }
            start += n
        }
        return [dx, dw]
    }
}
