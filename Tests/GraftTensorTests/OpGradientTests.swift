import Foundation
import GraftTestSupport
import Testing
@testable import GraftTensor

/// Every differentiable op: forward against a Float64 reference and gradients against finite differences.
@Suite struct OpGradientTests {
    let check = GradientCheck()

    @Test func addWithBroadcasting() {
        let a = randomValues(12, seed: 1), b = randomValues(4, seed: 2), c = randomValues(3, seed: 3)
        check.run("add suffix", inputs: [a, b], shapes: [[3, 4], [4]], trainable: [true, true],
                  op: { add($0[0], $0[1]) },
                  reference: { x in (0..<12).map { x[0][$0] + x[1][$0 % 4] } })
        check.run("add general", inputs: [a, c], shapes: [[3, 4], [3, 1]], trainable: [true, true],
                  op: { add($0[0], $0[1]) },
                  reference: { x in (0..<12).map { x[0][$0] + x[1][$0 / 4] } })
        check.run("sub", inputs: [a, a.reversed()], shapes: [[3, 4], [3, 4]], trainable: [true, true],
                  op: { sub($0[0], $0[1]) },
                  reference: { x in (0..<12).map { x[0][$0] - x[1][$0] } })
    }

    @Test func mulWithBroadcasting() {
        let a = randomValues(24, seed: 4), b = randomValues(6, seed: 5), s = randomValues(1, seed: 6)
        check.run("mul suffix", inputs: [a, b], shapes: [[2, 2, 6], [6]], trainable: [true, true],
                  op: { mul($0[0], $0[1]) },
                  reference: { x in (0..<24).map { x[0][$0] * x[1][$0 % 6] } })
        check.run("mul general", inputs: [a, b], shapes: [[2, 6, 2], [1, 6, 1]], trainable: [true, true],
                  op: { mul($0[0], $0[1]) },
                  reference: { x in (0..<24).map { x[0][$0] * x[1][($0 / 2) % 6] } })
        check.run("mul scalar tensor", inputs: [a, s], shapes: [[24], [1]], trainable: [true, true],
                  op: { mul($0[0], $0[1]) },
                  reference: { x in x[0].map { $0 * x[1][0] } })
        check.run("scale", inputs: [a], shapes: [[24]], trainable: [true],
                  op: { mul($0[0], 0.37) }, reference: { x in x[0].map { $0 * Double(Float(0.37)) } })
        check.run("mean", inputs: [a], shapes: [[24]], trainable: [true],
                  op: { mean($0[0]) }, reference: { x in [x[0].reduce(0, +) / 24] })
    }

    @Test func linearLayer() {
        let x = randomValues(15, seed: 7), w = randomValues(20, seed: 8), b = randomValues(4, seed: 9)
        check.run("linear", inputs: [x, w, b], shapes: [[3, 5], [4, 5], [4]], trainable: [true, true, true],
                  op: { linear($0[0], $0[1], $0[2]) },
                  reference: { v in Ref.linear(v[0], v[1], v[2], rows: 3, inF: 5, outF: 4) })
        check.run("linear frozen weight", inputs: [x, w], shapes: [[1, 3, 5], [4, 5]], trainable: [true, false],
                  op: { linear($0[0], $0[1]) },
                  reference: { v in Ref.linear(v[0], v[1], nil, rows: 3, inF: 5, outF: 4) })
    }

    @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
    func matmulTransposes(ta: Bool, tb: Bool) {
        let (m, k, n) = (3, 4, 5)
        let aShape = ta ? [k, m] : [m, k], bShape = tb ? [n, k] : [k, n]
        let a = randomValues(m * k * 2, seed: 10), b = randomValues(k * n * 2, seed: 11)
        check.run("matmul \(ta) \(tb)", inputs: [Array(a[0..<(m * k)]), Array(b[0..<(k * n)])],
                  shapes: [aShape, bShape], trainable: [true, true],
                  op: { matmul($0[0], $0[1], transposeA: ta, transposeB: tb) },
                  reference: { v in Ref.matmul(v[0], v[1], ar: aShape[0], ac: aShape[1], br: bShape[0], bc: bShape[1], ta: ta, tb: tb) })
        check.run("batched matmul \(ta) \(tb)", inputs: [a, b], shapes: [[2] + aShape, [2] + bShape],
                  trainable: [true, true],
                  op: { matmul($0[0], $0[1], transposeA: ta, transposeB: tb) },
                  reference: { v in
                      (0..<2).flatMap { i in
                          Ref.matmul(Array(v[0][(i * m * k)..<((i + 1) * m * k)]), Array(v[1][(i * k * n)..<((i + 1) * k * n)]),
                                     ar: aShape[0], ac: aShape[1], br: bShape[0], bc: bShape[1], ta: ta, tb: tb)
                      }
                  })
        check.run("shared-b matmul \(ta) \(tb)", inputs: [a, Array(b[0..<(k * n)])], shapes: [[2] + aShape, bShape],
                  trainable: [true, true],
                  op: { matmul($0[0], $0[1], transposeA: ta, transposeB: tb) },
                  reference: { v in
                      (0..<2).flatMap { i in
                          Ref.matmul(Array(v[0][(i * m * k)..<((i + 1) * m * k)]), v[1],
                                     ar: aShape[0], ac: aShape[1], br: bShape[0], bc: bShape[1], ta: ta, tb: tb)
                      }
                  })
    }

    @Test func softmaxAndLogSoftmax() {
        let x = randomValues(21, seed: 12, scale: 3)
        check.run("softmax", inputs: [x], shapes: [[3, 7]], trainable: [true],
                  op: { softmax($0[0]) }, reference: { Ref.softmax($0[0], n: 7) })
        check.run("logSoftmax", inputs: [x], shapes: [[3, 7]], trainable: [true],
                  op: { logSoftmax($0[0]) }, reference: { Ref.logSoftmax($0[0], n: 7) })
    }

    @Test func norms() {
        let x = randomValues(24, seed: 13, scale: 2), w = randomValues(8, seed: 14), b = randomValues(8, seed: 15)
        check.run("layerNorm", inputs: [x, w, b], shapes: [[3, 8], [8], [8]], trainable: [true, true, true],
                  op: { layerNorm($0[0], weight: $0[1], bias: $0[2], eps: 1e-5) },
                  reference: { Ref.layerNorm($0[0], $0[1], $0[2], n: 8, eps: 1e-5) })
        check.run("rmsNorm", inputs: [x, w], shapes: [[3, 8], [8]], trainable: [true, true],
                  op: { rmsNorm($0[0], weight: $0[1], eps: 1e-5) },
                  reference: { Ref.rmsNorm($0[0], $0[1], n: 8, eps: 1e-5) })
        // Rows of 37: two full 16-lane vectors and a tail.
        let x37 = randomValues(74, seed: 50, scale: 2), w37 = randomValues(37, seed: 51), b37 = randomValues(37, seed: 52)
        check.run("layerNorm 37", inputs: [x37, w37, b37], shapes: [[2, 37], [37], [37]], trainable: [true, true, true],
                  op: { layerNorm($0[0], weight: $0[1], bias: $0[2], eps: 1e-5) },
                  reference: { Ref.layerNorm($0[0], $0[1], $0[2], n: 37, eps: 1e-5) })
        check.run("rmsNorm 37", inputs: [x37, w37], shapes: [[2, 37], [37]], trainable: [true, true],
                  op: { rmsNorm($0[0], weight: $0[1], eps: 1e-5) },
                  reference: { Ref.rmsNorm($0[0], $0[1], n: 37, eps: 1e-5) })
    }

    @Test func activations() {
        let x = randomValues(30, seed: 16, scale: 4)
        check.run("gelu", inputs: [x], shapes: [[30]], trainable: [true], op: { gelu($0[0]) }, reference: { Ref.gelu($0[0]) })
        check.run("silu", inputs: [x], shapes: [[30]], trainable: [true], op: { silu($0[0]) }, reference: { Ref.silu($0[0]) })
        check.run("tanh", inputs: [x], shapes: [[30]], trainable: [true], op: { GraftTensor.tanh($0[0]) },
                  reference: { $0[0].map { Foundation.tanh($0) } })
        check.run("sigmoid", inputs: [x], shapes: [[30]], trainable: [true], op: { sigmoid($0[0]) },
                  reference: { $0[0].map { 1 / (1 + Foundation.exp(-$0)) } })
        // 37 elements: two full 16-lane vectors and a tail.
        let g = randomValues(37, seed: 48, scale: 4), u = randomValues(37, seed: 49, scale: 2)
        for trainable in [[true, true], [true, false], [false, true]] {
            check.run("swiglu \(trainable)", inputs: [g, u], shapes: [[37], [37]], trainable: trainable, op: { swiglu($0[0], $0[1]) },
                      reference: { v in zip(Ref.silu(v[0]), v[1]).map { $0 * $1 } })
        }
    }

    /// The fused SwiGLU computes exactly what `silu(gate) * up` computes, forward and both gradients.
    @Test func swigluEqualsSiluTimesUp() throws {
        var rng = GraftRNG(seed: 50)
        let g = Tensor.randomNormal([3, 45], rng: &rng).requiringGrad(), u = Tensor.randomNormal([3, 45], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([3, 45], rng: &rng)
        let fused = swiglu(g, u)
        sum(mul(fused, w)).backward()
        let (fusedDG, fusedDU) = (try #require(g.grad).scalars, try #require(u.grad).scalars)
        g.zeroGrad()
        u.zeroGrad()
        let unfused = silu(g) * u
        sum(mul(unfused, w)).backward()
        #expect(fused.scalars == unfused.scalars)
        let (unfusedDG, unfusedDU) = (try #require(g.grad).scalars, try #require(u.grad).scalars)
        #expect(fusedDG == unfusedDG && fusedDU == unfusedDU)
        #expect(fused.scalars.allSatisfy(\.isFinite) && fusedDG.allSatisfy(\.isFinite))
    }

    @Test func embeddingGather() {
        let table = randomValues(5 * 3, seed: 17)
        let ids: [Int32] = [4, 0, 4, 2]
        check.run("embedding", inputs: [table], shapes: [[5, 3]], trainable: [true],
                  op: { embedding(ids, table: $0[0]) },
                  reference: { v in ids.flatMap { id in (0..<3).map { v[0][Int(id) * 3 + $0] } } })
    }

    @Test(arguments: [true, false])
    func rotaryEmbedding(half: Bool) {
        let x = randomValues(3 * 2 * 8, seed: 18)
        let pos: [Int32] = [0, 5, 17]
        check.run("rope half=\(half)", inputs: [x], shapes: [[3, 2, 8]], trainable: [true],
                  op: { rope($0[0], positions: pos, headDim: 8, base: 10000, style: half ? .halfSplit : .adjacentPairs) },
                  reference: { Ref.rope($0[0], positions: pos.map(Int.init), heads: 2, d: 8, base: 10000, half: half) })
    }

    @Test func shapeOps() {
        let x = randomValues(24, seed: 19), y = randomValues(8, seed: 20)
        check.run("reshape", inputs: [x], shapes: [[2, 3, 4]], trainable: [true],
                  op: { mul($0[0].reshaped([6, -1]), 2) }, reference: { $0[0].map { $0 * 2 } })
        check.run("permute", inputs: [x], shapes: [[2, 3, 4]], trainable: [true],
                  op: { $0[0].permuted([2, 0, 1]) },
                  reference: { v in
                      var out: [Double] = []
                      for k in 0..<4 { for i in 0..<2 { for j in 0..<3 { out.append(v[0][i * 12 + j * 4 + k]) } } }
                      return out
                  })
        check.run("slice", inputs: [x], shapes: [[2, 3, 4]], trainable: [true],
                  op: { $0[0].slice(dim: 1, 1..<3) },
                  reference: { v in
                      var out: [Double] = []
                      for i in 0..<2 { for j in 1..<3 { for k in 0..<4 { out.append(v[0][i * 12 + j * 4 + k]) } } }
                      return out
                  })
        check.run("concat", inputs: [x, y], shapes: [[2, 3, 4], [2, 1, 4]], trainable: [true, true],
                  op: { concat([$0[0], $0[1]], dim: 1) },
                  reference: { v in
                      var out: [Double] = []
                      for i in 0..<2 {
                          out += v[0][(i * 12)..<(i * 12 + 12)]
                          out += v[1][(i * 4)..<(i * 4 + 4)]
                      }
                      return out
                  })
    }

    @Test func attentionWithPaddingAndGroupedHeads() {
        let (batch, t, heads, kvHeads, d) = (2, 4, 4, 2, 3)
        let q = randomValues(batch * t * heads * d, seed: 21, scale: 2)
        let k = randomValues(batch * t * kvHeads * d, seed: 22, scale: 2)
        let v = randomValues(batch * t * kvHeads * d, seed: 23)
        let lengths = [4, 2]
        check.run("attention padded", inputs: [q, k, v],
                  shapes: [[batch, t, heads * d], [batch, t, kvHeads * d], [batch, t, kvHeads * d]],
                  trainable: [true, true, true],
                  op: { scaledDotProductAttention(query: $0[0], key: $0[1], value: $0[2], heads: heads, kvHeads: kvHeads,
                                                  mask: AttentionMask(keyLengths: lengths)) },
                  reference: { Ref.attention(q: $0[0], k: $0[1], v: $0[2], batch: batch, tq: t, tk: t, heads: heads,
                                             kvHeads: kvHeads, d: d, visible: { b, _, j in j < lengths[b] }) })
        check.run("attention causal", inputs: [q, k, v],
                  shapes: [[batch, t, heads * d], [batch, t, kvHeads * d], [batch, t, kvHeads * d]],
                  trainable: [true, true, true],
                  op: { scaledDotProductAttention(query: $0[0], key: $0[1], value: $0[2], heads: heads, kvHeads: kvHeads,
                                                  mask: AttentionMask(causal: true)) },
                  reference: { Ref.attention(q: $0[0], k: $0[1], v: $0[2], batch: batch, tq: t, tk: t, heads: heads,
                                             kvHeads: kvHeads, d: d, visible: { _, i, j in j <= i }) })
        let segments: [Int32] = [0, 0, 1, 1, 0, 1, 1, 1]
        check.run("attention packed segments", inputs: [q, k, v],
                  shapes: [[batch, t, heads * d], [batch, t, kvHeads * d], [batch, t, kvHeads * d]],
                  trainable: [true, true, true],
                  op: { scaledDotProductAttention(query: $0[0], key: $0[1], value: $0[2], heads: heads, kvHeads: kvHeads,
                                                  mask: AttentionMask(segments: segments)) },
                  reference: { Ref.attention(q: $0[0], k: $0[1], v: $0[2], batch: batch, tq: t, tk: t, heads: heads,
                                             kvHeads: kvHeads, d: d,
                                             visible: { b, i, j in segments[b * t + i] == segments[b * t + j] }) })
    }

    @Test func crossEntropyWithIgnoreIndex() {
        let logits = randomValues(4 * 5, seed: 24, scale: 3)
        let targets: [Int32] = [1, -100, 4, 0]
        check.run("crossEntropy", inputs: [logits], shapes: [[4, 5]], trainable: [true],
                  op: { crossEntropy($0[0], targets: targets) },
                  reference: { [Ref.crossEntropy($0[0], targets: targets.map(Int.init), classes: 5, ignore: -100)] })
    }

    @Test func chunkedLinearCrossEntropy() {
        let x = randomValues(5 * 4, seed: 25, scale: 2), w = randomValues(7 * 4, seed: 26)
        let targets: [Int32] = [3, -100, 6, 0, 3]
        for chunk in [1, 2, 8] {
            check.run("linearCrossEntropy chunk \(chunk)", inputs: [x, w], shapes: [[5, 4], [7, 4]], trainable: [true, true],
                      op: { linearCrossEntropy($0[0], weight: $0[1], targets: targets, chunkRows: chunk) },
                      reference: { v in
                          [Ref.crossEntropy(Ref.linear(v[0], v[1], nil, rows: 5, inF: 4, outF: 7), targets: targets.map(Int.init), classes: 7, ignore: -100)]
                      })
        }
    }

    @Test func kroneckerProduct() {
        let a = randomValues(2 * 3, seed: 27), b = randomValues(4 * 2, seed: 28)
        check.run("kron", inputs: [a, b], shapes: [[2, 3], [4, 2]], trainable: [true, true],
                  op: { kron($0[0], $0[1]) },
                  reference: { v in
                      var out = [Double](repeating: 0, count: 8 * 6)
                      for i in 0..<2 { for j in 0..<3 { for k in 0..<4 { for l in 0..<2 {
                          out[(i * 4 + k) * 6 + j * 2 + l] = v[0][i * 3 + j] * v[1][k * 2 + l]
                      } } } }
                      return out
                  })
    }

    @Test func scalarFunctions() {
        let x = randomValues(12, seed: 29, scale: 3)
        let positive = x.map { abs($0) + 0.5 }
        check.run("sqrt", inputs: [positive], shapes: [[12]], trainable: [true], op: { GraftTensor.sqrt($0[0]) },
                  reference: { $0[0].map { $0.squareRoot() } })
        check.run("reciprocal", inputs: [positive], shapes: [[12]], trainable: [true], op: { reciprocal($0[0]) },
                  reference: { $0[0].map { 1 / $0 } })
        check.run("cos", inputs: [x], shapes: [[12]], trainable: [true], op: { GraftTensor.cos($0[0]) },
                  reference: { $0[0].map { Foundation.cos($0) } })
        check.run("sin", inputs: [x], shapes: [[12]], trainable: [true], op: { GraftTensor.sin($0[0]) },
                  reference: { $0[0].map { Foundation.sin($0) } })
    }

    @Test func sparseToDense() {
        let v = randomValues(4, seed: 30)
        let rows: [Int32] = [0, 2, 1, 2], cols: [Int32] = [1, 0, 2, 0]
        check.run("denseFromSparse", inputs: [v], shapes: [[4]], trainable: [true],
                  op: { denseFromSparse($0[0], rowIndex: rows, colIndex: cols, rows: 3, cols: 3) },
                  reference: { x in
                      var d = [Double](repeating: 0, count: 9)
                      for i in 0..<4 { d[Int(rows[i]) * 3 + Int(cols[i])] += x[0][i] }
                      return d
                  })
    }
}
