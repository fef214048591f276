import Foundation
import Testing
@testable import GraftAdapters
import GraftModels
import GraftTensor
import GraftTestSupport

/// QA-LoRA (`use_qalora`): the update reads the group-pooled input as PEFT's variant computes it, its gradients
/// match central differences, and the options PEFT does not combine it with are refused by name.
@Suite struct QALoRATests {
    func toy(_ json: String, seed: UInt64 = 3) throws -> (Linear, AdaptedModel, NamedAdapter, QALoRALayer) {
        var rng = GraftRNG(seed: 11)
        let proj = Linear(weight: Tensor.randomNormal([6, 8], std: 0.5, rng: &rng), bias: Tensor.randomNormal([6], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let adapter = try model.addAdapter("q", config: AdapterConfig(jsonText: json, source: "qalora"), seed: seed)
        guard let layer = adapter.layers.first?.adapter as? QALoRALayer else { throw GraftError.invalid("not QA-LoRA") }
        return (proj, model, adapter, layer)
    }

    /// PEFT's arithmetic written out: `x.view(N, n, g).mean(2) · n`, then `· Aᵀ · Bᵀ · s`.
    @Test func updateReadsTheGroupPooledInput() throws {
        let (proj, model, _, layer) = try toy(#"{"peft_type":"LORA","r":2,"lora_alpha":6,"use_qalora":true,"qalora_group_size":4,"init_lora_weights":false,"target_modules":["proj"]}"#)
        #expect(layer.loraA.shape == [2, 2] && layer.loraB.shape == [6, 2] && layer.scaling == 3)
        var rng = GraftRNG(seed: 5)
        let x = Tensor.randomNormal([3, 8], rng: &rng)
        let adapted = withNoGrad { proj.forward(x) }
        let base = try model.withAdaptersDisabled { withNoGrad { proj.forward(x) } }
        let (a, b) = (layer.loraA.scalars, layer.loraB.scalars)
        var worst: Float = 0
        for row in 0..<3 {
            let pooled = (0..<2).map { p in (0..<4).reduce(Float(0)) { $0 + x.pointer[row * 8 + p * 4 + $1] } / 4 * 2 }
            let h = (0..<2).map { k in (0..<2).reduce(Float(0)) { $0 + pooled[$1] * a[k * 2 + $1] } }
            for o in 0..<6 {
                let delta = (0..<2).reduce(Float(0)) { $0 + h[$1] * b[o * 2 + $1] } * 3
                worst = max(worst, abs(adapted.pointer[row * 6 + o] - base.pointer[row * 6 + o] - delta))
            }
        }
        #expect(worst < 1e-5, "QA-LoRA update differs from PEFT's arithmetic by \(worst)")
    }

    @Test func gradientsMatchFiniteDifferences() throws {
        let (proj, _, adapter, _) = try toy(#"{"peft_type":"LORA","r":3,"lora_alpha":4,"use_rslora":true,"use_qalora":true,"qalora_group_size":2,"init_lora_weights":false,"target_modules":["proj"]}"#)
        var rng = GraftRNG(seed: 7)
        let x = Tensor.randomNormal([3, 8], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([3, 6], rng: &rng)
        func objective() -> Double {
            zip(withNoGrad { proj.forward(x.detached()) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let loss = sum(proj.forward(x) * w)
        #expect(loss.item.isFinite)
        loss.backward()
        let check = finiteDifferenceCheck(adapter.peftStateDict + [("input", x)], step: 1e-2, relativeStep: true, report: 2e-3, value: objective)
        #expect(check.missing.isEmpty, "no gradient for \(check.missing)")
        print("QA-LoRA gradient check: worst relative error \(check.worst)")
        #expect(check.worst < 2e-3, "worst gradient error \(check.worst)")
    }

    /// Plain gradient descent on the adapter alone fits a target the base misses.
    @Test func shortFineTuneLowersTheLoss() throws {
        let (proj, _, adapter, _) = try toy(#"{"peft_type":"LORA","r":2,"lora_alpha":4,"use_qalora":true,"qalora_group_size":2,"target_modules":["proj"]}"#)
        var rng = GraftRNG(seed: 9)
        let x = Tensor.randomNormal([16, 8], rng: &rng)
        let target = Tensor.randomNormal([16, 6], rng: &rng)
        func loss() -> Tensor { let d = proj.forward(x) - target; return sum(d * d) * (1 / Float(d.count)) }
        let before = withNoGrad { loss() }.item
        for _ in 0..<20 {
            for (_, p) in adapter.peftStateDict { p.grad = nil }
            loss().backward()
            for (_, p) in adapter.peftStateDict {
                guard let g = p.grad else { continue }
                for i in 0..<p.count { p.pointer[i] -= 0.05 * g.pointer[i] }
            }
        }
        let after = withNoGrad { loss() }.item
        print("QA-LoRA toy fine-tune: loss \(before) -> \(after)")
        #expect(after.isFinite && after < before - 1e-3, "loss \(before) -> \(after)")
    }

    @Test(arguments: [
        (#""qalora_group_size": 3"#, "qalora_group_size"),
        (#""qalora_group_size": 0"#, "qalora_group_size"),
        (#""use_dora": true"#, "use_dora"),
        (#""lora_bias": true"#, "lora_bias"),
        (#""init_lora_weights": "pissa""#, "init_lora_weights"),
    ])
    func unsupportedCombinationsAreRejectedByName(extra: String, key: String) {
        var rng = GraftRNG(seed: 1)
        let proj = Linear(weight: Tensor.randomNormal([8, 8], rng: &rng), bias: nil)
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let json = #"{"peft_type":"LORA","r":2,"use_qalora":true,"target_modules":["proj"],"# + extra + "}"
        do {
            _ = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: "adapter_config.json"))
            Issue.record("\(key): accepted")
        } catch let e as GraftError {
            #expect(e.message.contains(key), "\(key): \(e.message)")
        } catch {
            Issue.record("\(error)")
        }
    }
}
