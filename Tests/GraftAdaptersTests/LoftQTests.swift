import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// LoftQ with Graft's quantizer (`init_lora_weights: "loftq"`): PEFT's LoftQ needs bitsandbytes on a GPU, so there is
/// no PEFT fixture; these check the algorithm's defining properties instead.
@Suite struct LoftQTests {
    func toy(_ json: String) throws -> (Linear, AdaptedModel, NamedAdapter, LoRALayer) {
        var rng = GraftRNG(seed: 4)
        let proj = Linear(weight: Tensor.randomNormal([48, 64], std: 0.5, rng: &rng), bias: Tensor.randomNormal([48], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let adapter = try model.addAdapter("q", config: AdapterConfig(jsonText: json, source: "loftq"))
        guard let layer = adapter.layers.first?.adapter as? LoRALayer else { throw GraftError.invalid("not LoRA") }
        return (proj, model, adapter, layer)
    }

    /// The layer computes `Q x + s·B A x` with Q Graft's Q4_1 round trip of W, and `Q + B A` (s = 1) is closer to W
    /// than Q alone, closer still with more alternating iterations.
    @Test func adapterFitsTheQuantizationError() throws {
        var errors: [Double] = []
        for iterations in [1, 4] {
            let json = #"{"peft_type":"LORA","r":8,"lora_alpha":8,"init_lora_weights":"loftq","loftq_config":{"loftq_bits":4,"loftq_iter":"# + "\(iterations)" + #"},"target_modules":["proj"]}"#
            let (proj, model, _, layer) = try toy(json)
            let q = try quantizeRoundTrip(proj.weight, format: .q4_1, what: "test")
            var rng = GraftRNG(seed: 8)
            let x = Tensor.randomNormal([5, 64], rng: &rng)
            let got = withNoGrad { proj.forward(x) }
            let expected = withNoGrad { linear(x, q, proj.bias) + linear(linear(x, layer.loraA), layer.loraB) }
            if iterations == 1 { #expect(maxAbsDifference(got, expected) < 1e-4, "the layer is Q x + s·B A x") }
            let approx = withNoGrad { (iterations == 1 ? q : proj.weight - layer.quantizationError!) + matmul(layer.loraB, layer.loraA) }
            let residual = withNoGrad { proj.weight - approx }.scalars.reduce(0.0) { $0 + Double($1 * $1) }
            let quantOnly = withNoGrad { proj.weight - q }.scalars.reduce(0.0) { $0 + Double($1 * $1) }
            if iterations == 1 { #expect(residual < 0.9 * quantOnly, "‖W − Q − BA‖² \(residual) vs ‖W − Q‖² \(quantOnly)") }
            errors.append(residual)
            // Merging folds in Q + s·B A; unmerging restores W.
            try model.merge("q")
            #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, got) < 1e-4)
            try model.unmerge("q")
            #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, got) < 1e-4)
        }
        print("LoftQ ‖W − (Q + BA)‖²: 1 iteration \(errors[0]), 4 iterations \(errors[1])")
        #expect(errors[1] <= errors[0] * 1.0001)
    }

    /// A LoftQ adapter saved by Graft reloads to the same function (Q is recomputed from W), and trains: the
    /// gradients of A, B and the input match central differences.
    @Test func reloadsExactlyAndHasCorrectGradients() throws {
        let json = #"{"peft_type":"LORA","r":4,"lora_alpha":8,"init_lora_weights":"loftq","loftq_config":{"loftq_bits":8,"loftq_iter":2},"target_modules":["proj"]}"#
        let (proj, model, adapter, _) = try toy(json)
        var rng = GraftRNG(seed: 9)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.1 * rng.nextNormal() } }
        let x = Tensor.randomNormal([3, 64], rng: &rng).requiringGrad()
        let before = withNoGrad { proj.forward(x.detached()) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-loftq-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("q", directory: dir)
        try model.deleteAdapter("q")
        try model.loadAdapter(directory: dir)
        #expect(maxAbsDifference(withNoGrad { proj.forward(x.detached()) }, before) == 0)
        let reloaded = try model.adapter("default")
        let w = Tensor.randomNormal([3, 48], rng: &rng)
        func objective() -> Double { zip(withNoGrad { proj.forward(x.detached()) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) } }
        let loss = sum(proj.forward(x) * w)
        #expect(loss.item.isFinite)
        loss.backward()
        let check = finiteDifferenceCheck(reloaded.peftStateDict + [("input", x)], step: 1e-2, relativeStep: true, report: 2e-3, value: objective)
        print("LoftQ gradient check: worst relative error \(check.worst)")
        #expect(check.missing.isEmpty && check.worst < 2e-3, "worst \(check.worst)")
    }

    @Test func optionsAreCheckedByName() throws {
        for (extra, key) in [(#""loftq_config":{"loftq_bits":3}"#, "loftq_bits"), (#""loftq_config":{"loftq_iter":0}"#, "loftq_iter"),
                             (#""use_dora":true"#, "use_dora")] {
            do {
                _ = try toy(#"{"peft_type":"LORA","r":2,"target_modules":["proj"],"init_lora_weights":"loftq","# + extra + "}")
                Issue.record("\(key): accepted")
            } catch let e as GraftError {
                #expect(e.message.contains(key), "\(e.message)")
            }
        }
    }
}
