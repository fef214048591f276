import Foundation
import Testing
@testable import GraftAdapters
import GraftModels
import GraftTensor
import GraftTestSupport

/// Inference adds plain LoRA's update straight into the layer's output (``LoRALayer/addInPlace(input:into:layer:)``,
/// its decode-step rows shared out over the threads). It must give the definition `W x + b + (α/r)·B A x`, and
/// every variant it cannot fuse (DoRA, `lora_bias`, KaSA, LoftQ's error, PiSSA's frozen factors) must still run
/// its own forward when no gradient is recorded.
@Suite(.serialized) struct LoRAInferenceTests {
    // Wide enough that a one-row product splits A's rows and B's rows over two threads.
    let inF = 1024, outF = 600, rank = 16

    func makeLayer(dora: Bool = false, bias: Bool = false) -> (Linear, LoRALayer, [Double], [Double]) {
        let w = randomValues(outF * inF, seed: 41, scale: 0.05), b = randomValues(outF, seed: 42)
        let base = Linear(weight: Tensor(shape: [outF, inF], values: w.map(Float.init)),
                          bias: Tensor(shape: [outF], values: b.map(Float.init)))
        let layer = LoRALayer(base: base, rank: rank, alpha: 24, useRSLoRA: false, dropout: 0, useDoRA: dora,
                              initLoraWeights: false, bias: bias, state: AdapterState(seed: 6))
        base.adapters = [layer]
        return (base, layer, w, b)
    }

    /// Worst |a − b| relative to the largest |b| (NaN if either holds a NaN).
    func relativeError(_ a: Tensor, _ b: Tensor) -> Float {
        let scale = worstOf(b.scalars.map(abs), empty: 0)
        return maxAbsDifference(a, b) / Swift.max(scale, 1e-30)
    }

    @Test(arguments: [1, 2, 5])
    func inPlaceUpdateMatchesTheDefinition(rows: Int) {
        Threading.setThreads(2)
        let (base, layer, w, b) = makeLayer()
        let x = randomValues(rows * inF, seed: UInt64(50 + rows))
        let a = layer.loraA.scalars.map(Double.init), bb = layer.loraB.scalars.map(Double.init), s = Double(layer.scaling)
        var expected = [Double](repeating: 0, count: rows * outF)
        for i in 0..<rows {
            var h = [Double](repeating: 0, count: rank)
            for k in 0..<rank { for j in 0..<inF { h[k] += a[k * inF + j] * x[i * inF + j] } }
            for o in 0..<outF {
                var v = b[o]
                for j in 0..<inF { v += w[o * inF + j] * x[i * inF + j] }
                for k in 0..<rank { v += s * bb[o * rank + k] * h[k] }
                expected[i * outF + o] = v
            }
        }
        let out = withNoGrad { base.forward(Tensor(shape: [rows, inF], values: x.map(Float.init))) }
        let error = relativeError(out, Tensor(shape: [rows, outF], values: expected.map(Float.init)))
        print("LoRA in-place inference, \(rows) row(s): relative error \(error)")
        #expect(error < 1e-5, "relative error \(error)")
    }

    /// Variants with parts the fused update leaves out give, without gradients, what their recorded forward gives.
    @Test(arguments: ["dora", "lora_bias", "kasa", "loftq", "pissa"])
    func unfusableVariantsKeepTheirOwnForward(variant: String) {
        Threading.setThreads(2)
        let (base, layer, _, _) = makeLayer(dora: variant == "dora", bias: variant == "lora_bias")
        if let loraBias = layer.loraBias { for i in 0..<loraBias.count { loraBias.pointer[i] = 0.3 } }
        let extra = { (shape: [Int], seed: UInt64) in Tensor(shape: shape, values: randomValues(shape.reduce(1, *), seed: seed, scale: 0.1).map(Float.init)) }
        switch variant {
        case "kasa": layer.kasaDiagonal = extra([rank], 61)
        case "loftq": layer.quantizationError = extra([outF, inF], 62)
        case "pissa": layer.initialFactors = (extra([rank, inF], 63), extra([outF, rank], 64))
        default: break
        }
        #expect(!layer.isFusable)
        let x = Tensor(shape: [2, inF], values: randomValues(2 * inF, seed: 65).map(Float.init))
        let recorded = base.forward(x)
        let inference = withNoGrad { base.forward(x) }
        let plainUpdate = withNoGrad { () -> Tensor in
            let copy = linear(x, base.weight, base.bias)
            layer.addUpdate(input: x.pointer, into: copy.pointer, rows: 2, inFeatures: inF, outFeatures: outF)
            return copy
        }
        let error = relativeError(inference, recorded)
        print("LoRA variant \(variant): inference vs recorded forward \(error), the plain update would be \(relativeError(plainUpdate, recorded)) off")
        #expect(error < 1e-5, "\(variant): \(error)")
        // The variant's extra part matters, so skipping it would have been caught.
        #expect(relativeError(plainUpdate, recorded) > 1e-3, "\(variant): the variant's part does not move the output")
    }
}
