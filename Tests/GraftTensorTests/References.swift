import Foundation
import GraftTestSupport

/// Naive Float64 reference implementations used by the gradient checks. Written for clarity, not speed,
/// and independently of the Float32 kernels they check.
enum Ref {
    static func linear(_ x: [Double], _ w: [Double], _ b: [Double]?, rows: Int, inF: Int, outF: Int) -> [Double] {
        var y = [Double](repeating: 0, count: rows * outF)
        for r in 0..<rows {
            for o in 0..<outF {
                var s = b?[o] ?? 0
                for i in 0..<inF { s += x[r * inF + i] * w[o * inF + i] }
                y[r * outF + o] = s
            }
        }
        return y
    }

    /// C = op(A) op(B) for one matrix pair; A stored ar×ac, B stored br×bc.
    static func matmul(_ a: [Double], _ b: [Double], ar: Int, ac: Int, br: Int, bc: Int, ta: Bool, tb: Bool) -> [Double] {
        let m = ta ? ac : ar, k = ta ? ar : ac, n = tb ? br : bc
        func A(_ i: Int, _ j: Int) -> Double { ta ? a[j * ac + i] : a[i * ac + j] }
        func B(_ i: Int, _ j: Int) -> Double { tb ? b[j * bc + i] : b[i * bc + j] }
        var c = [Double](repeating: 0, count: m * n)
        for i in 0..<m { for j in 0..<n { var s = 0.0; for p in 0..<k { s += A(i, p) * B(p, j) }; c[i * n + j] = s } }
        return c
    }

    static func softmax(_ x: [Double], n: Int) -> [Double] {
        var y = x
        for r in 0..<(x.count / n) {
            let row = x[(r * n)..<((r + 1) * n)]
            let m = row.max() ?? 0
            let e = row.map { Foundation.exp($0 - m) }
            let s = e.reduce(0, +)
            for j in 0..<n { y[r * n + j] = e[j] / s }
        }
        return y
    }

    static func logSoftmax(_ x: [Double], n: Int) -> [Double] {
        var y = x
        for r in 0..<(x.count / n) {
            let row = Array(x[(r * n)..<((r + 1) * n)])
            let m = row.max() ?? 0
            let lse = m + Foundation.log(row.map { Foundation.exp($0 - m) }.reduce(0, +))
            for j in 0..<n { y[r * n + j] = row[j] - lse }
        }
        return y
    }

    static func layerNorm(_ x: [Double], _ w: [Double], _ b: [Double], n: Int, eps: Double) -> [Double] {
        var y = x
        for r in 0..<(x.count / n) {
            let row = x[(r * n)..<((r + 1) * n)]
            let mu = row.reduce(0, +) / Double(n)
            let v = row.map { ($0 - mu) * ($0 - mu) }.reduce(0, +) / Double(n)
            for j in 0..<n { y[r * n + j] = (x[r * n + j] - mu) / (v + eps).squareRoot() * w[j] + b[j] }
        }
        return y
    }

    static func rmsNorm(_ x: [Double], _ w: [Double], n: Int, eps: Double) -> [Double] {
        var y = x
        for r in 0..<(x.count / n) {
            let ms = x[(r * n)..<((r + 1) * n)].map { $0 * $0 }.reduce(0, +) / Double(n)
            for j in 0..<n { y[r * n + j] = x[r * n + j] / (ms + eps).squareRoot() * w[j] }
        }
        return y
    }

    static func gelu(_ x: [Double]) -> [Double] { x.map { 0.5 * $0 * (1 + Foundation.erf($0 / 2.0.squareRoot())) } }
    static func silu(_ x: [Double]) -> [Double] { x.map { $0 / (1 + Foundation.exp(-$0)) } }

    /// Rotary embedding on [tokens, heads, d].
    static func rope(_ x: [Double], positions: [Int], heads: Int, d: Int, base: Double, half: Bool) -> [Double] {
        var y = x
        for t in 0..<positions.count {
            for h in 0..<heads {
                let o = (t * heads + h) * d
                for i in 0..<(d / 2) {
                    let angle = Double(positions[t]) * Foundation.pow(base, -Double(2 * i) / Double(d))
                    let (ia, ib) = half ? (i, i + d / 2) : (2 * i, 2 * i + 1)
                    let a = x[o + ia], b = x[o + ib]
                    y[o + ia] = a * Foundation.cos(angle) - b * Foundation.sin(angle)
                    y[o + ib] = b * Foundation.cos(angle) + a * Foundation.sin(angle)
                }
            }
        }
        return y
    }

    /// Attention on [batch, tq, heads*d] / [batch, tk, kvHeads*d] with a visibility predicate.
    static func attention(
        q: [Double], k: [Double], v: [Double], batch: Int, tq: Int, tk: Int, heads: Int, kvHeads: Int, d: Int,
        visible: (Int, Int, Int) -> Bool
    ) -> [Double] {
        var out = [Double](repeating: 0, count: batch * tq * heads * d)
        let group = heads / kvHeads
        for b in 0..<batch {
            for h in 0..<heads {
                let kh = h / group
                for i in 0..<tq {
                    var scores = [Double](repeating: -Double.infinity, count: tk)
                    for j in 0..<tk where visible(b, i, j) {
                        var s = 0.0
                        for c in 0..<d { s += q[(b * tq + i) * heads * d + h * d + c] * k[(b * tk + j) * kvHeads * d + kh * d + c] }
                        scores[j] = s / Double(d).squareRoot()
                    }
                    let m = scores.max() ?? 0
                    guard m > -Double.infinity else { continue }
                    let e = scores.map { Foundation.exp($0 - m) }
                    let z = e.reduce(0, +)
                    for c in 0..<d {
                        var s = 0.0
                        for j in 0..<tk { s += e[j] / z * v[(b * tk + j) * kvHeads * d + kh * d + c] }
                        out[(b * tq + i) * heads * d + h * d + c] = s
                    }
                }
            }
        }
        return out
    }

    static func crossEntropy(_ logits: [Double], targets: [Int], classes: Int, ignore: Int) -> Double {
        var total = 0.0
        var n = 0
        let ls = logSoftmax(logits, n: classes)
        for (r, t) in targets.enumerated() where t != ignore {
            total -= ls[r * classes + t]
            n += 1
        }
        return n == 0 ? 0 : total / Double(n)
    }
}
