import Foundation
import Testing
@testable import GraftAdapters
import GraftModels
import GraftTensor
import GraftTestSupport

/// Finite-difference checks of LoRA's and DoRA's trainable parameters (and of the input gradient they pass
/// down) against naive Float64 references, through the layers' own forward.
@Suite struct AdapterGradientTests {
    let inF = 5, outF = 4, rows = 3, rank = 2
    let check = GradientCheck()

    /// `B A` as `[out, in]` in Float64.
    func product(_ a: [Double], _ b: [Double]) -> [Double] {
        var d = [Double](repeating: 0, count: outF * inF)
        for o in 0..<outF { for i in 0..<inF { for k in 0..<rank { d[o * inF + i] += b[o * rank + k] * a[k * inF + i] } } }
        return d
    }

    func makeLayer(dora: Bool) -> (Linear, LoRALayer, [Double], [Double]) {
        let w = randomValues(outF * inF, seed: 31), b = randomValues(outF, seed: 32)
        let base = Linear(weight: Tensor(shape: [outF, inF], values: w.map(Float.init)),
                          bias: Tensor(shape: [outF], values: b.map(Float.init)))
        let layer = LoRALayer(base: base, rank: rank, alpha: 3, useRSLoRA: false, dropout: 0, useDoRA: dora,
                              initLoraWeights: false, state: AdapterState(seed: 5))
        return (base, layer, w, b)
    }

    @Test func loraGradientsMatchFiniteDifferences() {
        let (base, layer, w, b) = makeLayer(dora: false)
        let s = Double(layer.scaling)
        check.run("LoRA", inputs: [randomValues(rows * inF, seed: 33), layer.loraA.scalars.map(Double.init), layer.loraB.scalars.map(Double.init)],
                  shapes: [[rows, inF], [rank, inF], [outF, rank]], trainable: [true, true, true],
                  op: { t in layer.forward(input: t[0], baseOutput: linear(t[0], base.weight, base.bias), layer: base) },
                  reference: { v in
                      let d = product(v[1], v[2])
                      var y = [Double](repeating: 0, count: rows * outF)
                      for r in 0..<rows { for o in 0..<outF {
                          var acc = b[o]
                          for i in 0..<inF { acc += v[0][r * inF + i] * (w[o * inF + i] + s * d[o * inF + i]) }
                          y[r * outF + o] = acc
                      } }
                      return y
                  },
                  bound: [nil, layer.loraA, layer.loraB])
    }

    @Test func doraGradientsMatchFiniteDifferencesWithTheNormDetached() {
        let (base, layer, w, b) = makeLayer(dora: true)
        guard let magnitude = layer.magnitude else { Issue.record("DoRA layer has no magnitude"); return }
        let s = Double(layer.scaling)
        let a0 = layer.loraA.scalars.map(Double.init), b0 = layer.loraB.scalars.map(Double.init)
        let m0 = magnitude.scalars.enumerated().map { Double($0.element) * (1 + 0.1 * Double($0.offset)) }
        // DoRA treats the row norm ‖W + s·BA‖ as a constant (detached), so the reference fixes it at the
        // unperturbed point.
        let d0 = product(a0, b0)
        let norms = (0..<outF).map { o in (0..<inF).map { i in pow(w[o * inF + i] + s * d0[o * inF + i], 2) }.reduce(0, +).squareRoot() }
        check.run("DoRA", inputs: [randomValues(rows * inF, seed: 34), a0, b0, m0],
                  shapes: [[rows, inF], [rank, inF], [outF, rank], [outF]], trainable: [true, true, true, true],
                  op: { t in layer.forward(input: t[0], baseOutput: linear(t[0], base.weight, base.bias), layer: base) },
                  reference: { v in
                      let d = product(v[1], v[2])
                      var y = [Double](repeating: 0, count: rows * outF)
                      for r in 0..<rows { for o in 0..<outF {
                          var acc = 0.0
                          for i in 0..<inF { acc += v[0][r * inF + i] * (w[o * inF + i] + s * d[o * inF + i]) }
                          y[r * outF + o] = v[3][o] / norms[o] * acc + b[o]
                      } }
                      return y
                  },
                  bound: [nil, layer.loraA, layer.loraB, magnitude])
    }
}
