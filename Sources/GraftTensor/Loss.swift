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
        scaleProbabilities(prow, c, by: Float(1 / s))
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
