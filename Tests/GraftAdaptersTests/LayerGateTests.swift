import Foundation
import Testing
import Graft
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// TAPS and Selective LoRA: gradients against central differences (the gate's score by the straight-through
/// definition), the L1 penalty on the tape, gates below τ switching the layer off, merge / unmerge and the
/// save → load round trip under their Graft peft_types.
@Suite struct LayerGateTests {
    static let configs: [(String, String)] = [
        ("TAPS", #"{"peft_type":"TAPS","l1_weight":0.01,"target_modules":["proj"]}"#),
        ("Selective LoRA", #"{"peft_type":"SELECTIVE_LORA","r":2,"lora_alpha":4,"l1_weight":0.01,"target_modules":["proj"]}"#),
    ]

    static func toy(seed: UInt64) -> (Linear, ModuleList) {
        var rng = GraftRNG(seed: seed)
        let proj = Linear(weight: Tensor.randomNormal([6, 8], std: 0.5, rng: &rng), bias: Tensor.randomNormal([6], rng: &rng))
        return (proj, ModuleList(typeName: "Toy", [("proj", proj)]))
    }

    static func gate(_ adapter: NamedAdapter) -> LayerGate? {
        (adapter.layers.first?.adapter as? TAPSLayer)?.gate ?? (adapter.layers.first?.adapter as? SelectiveLoRALayer)?.gate
    }

    /// The weights' and the input's gradients match central differences; the score's gradient is the
    /// straight-through one, `Σ w ⊙ (update without the gate)` (the forward is flat in s away from τ).
    @Test(arguments: configs.map(\.0))
    func gradientsMatchFiniteDifferences(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        let (proj, root) = Self.toy(seed: 11)
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        var rng = GraftRNG(seed: 5)
        for (key, p) in adapter.peftStateDict where !key.contains("score") { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        let x = Tensor.randomNormal([3, 8], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([3, 6], rng: &rng)
        func objective() -> Double {
            let out = withNoGrad { proj.forward(x.detached()) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(proj.forward(x) * w).backward()
        let weights = (adapter.peftStateDict + [("input", x)]).filter { !$0.key.contains("score") }
        let check = finiteDifferenceCheck(weights, step: 1e-2, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty && check.worst < 2e-3, "\(method): worst \(check.worst), missing \(check.missing)")
        // Straight-through: ∂/∂s = Σ w ⊙ (ΔW x), ΔW the ungated update.
        let gate = try #require(Self.gate(adapter))
        let delta = try #require(adapter.layers.first?.adapter.deltaWeight(base: proj))
        let update = withNoGrad { linear(x.detached(), delta) }
        let expected = zip(update.scalars, w.scalars).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        let analytic = Double(try #require(gate.score.grad).item)
        #expect(abs(analytic - expected) <= 1e-4 * max(1, abs(expected)), "\(method): score gradient \(analytic), straight-through \(expected)")
    }

    /// The penalty `λ Σ|s|` is added to the trainer's loss and its gradient `λ·sign(s)` to the scores'.
    @Test(arguments: ["TAPS", "SELECTIVE_LORA"])
    func penaltyEntersTheLossAndTheGradient(type: String) throws {
        func run(weight: Double) throws -> (loss: Float, grads: [Float], scores: [Float]) {
            let bert = try Assets.loadMiniLM()
            let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
            let model = AdaptedModel(root: classifier)
            var json: [String: Any] = ["peft_type": type, "l1_weight": weight, "init_score": 0.7, "target_modules": ["query", "value"]]
            if type == "SELECTIVE_LORA" { json["r"] = 2 }
            let adapter = try model.addAdapter("default", config: AdapterConfig(json: json, source: type), seed: 1)
            let gates = adapter.layers.compactMap { ($0.adapter as? TAPSLayer)?.gate ?? ($0.adapter as? SelectiveLoRALayer)?.gate }
            var rng = GraftRNG(seed: 8)
            for (i, g) in gates.enumerated() where i % 3 == 0 { g.score.pointer[0] = -0.5 + 0.1 * rng.nextNormal() }
            for (key, p) in adapter.peftStateDict where !key.contains("score") { for i in 0..<p.count { p.pointer[i] += 0.01 * rng.nextNormal() } }
            var config = TrainerConfig()
            config.batchSize = 2
            let trainer = try Trainer(model: model, adapterName: "default",
                                      objective: SequenceClassificationObjective(model: classifier), config: config)
            let batch = try PackedBatch(ArraySlice([TokenizedExample(ids: [101, 7592, 2088, 102], label: 1),
                                                    TokenizedExample(ids: [101, 2023, 102], label: 2)]))
            let loss = try trainer.accumulate(batch)
            return (loss, gates.map { $0.score.grad?.item ?? .nan }, gates.map(\.score.item))
        }
        let plain = try run(weight: 0), penalised = try run(weight: 0.25)
        let l1 = penalised.scores.reduce(Float(0)) { $0 + abs($1) }
        #expect(abs(penalised.loss - plain.loss - 0.25 * l1) < 1e-4, "\(type): loss \(plain.loss) -> \(penalised.loss), 0.25·Σ|s| = \(0.25 * l1)")
        for (i, s) in penalised.scores.enumerated() {
            let expected = plain.grads[i] + 0.25 * (s > 0 ? 1 : -1)
            #expect(abs(penalised.grads[i] - expected) < 1e-5, "\(type) gate \(i): gradient \(penalised.grads[i]), expected \(expected)")
        }
    }

    /// A gate below τ switches the layer off: the output is the base model's, merging changes nothing and the
    /// update's weights get no gradient; the hook logs the switch and the report lists the layers still on.
    @Test(arguments: configs.map(\.0))
    func gatesBelowTheThresholdSwitchAdaptationOff(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        let (proj, root) = Self.toy(seed: 2)
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        var rng = GraftRNG(seed: 5)
        for (key, p) in adapter.peftStateDict where !key.contains("score") { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        let x = Tensor.randomNormal([3, 8], rng: &rng)
        let base = withNoGrad { model.withAdaptersDisabled { proj.forward(x) } }
        let on = withNoGrad { proj.forward(x) }
        #expect(maxAbsDifference(on, base) > 1e-3)
        let gate = try #require(Self.gate(adapter))
        let hook = try #require(adapter.trainingHooks.first as? GatePenalty)
        #expect(hook.layersOn == ["proj"])
        gate.score.pointer[0] = 0.05  // below τ = 0.1
        hook.didUpdate(step: 7, totalSteps: 10)
        let lines = hook.takeLogLines()
        #expect(lines.count == 1 && lines[0].contains("step 7: proj off"), "\(lines)")
        #expect(hook.layersOn.isEmpty && hook.reportLines().contains { $0.contains("proj: off") })
        #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, base) == 0)
        #expect(adapter.layers.first?.adapter.deltaWeight(base: proj)?.scalars.allSatisfy { $0 == 0 } == true)
        sum(proj.forward(x)).backward()
        for (key, p) in adapter.peftStateDict where !key.contains("score") {
            #expect(p.grad?.scalars.allSatisfy { $0 == 0 } ?? true, "\(method): \(key) has a gradient while off")
        }
    }

    /// Merge reproduces the output and unmerge restores W; save → load under the Graft peft_type reproduces it,
    /// with a switched-off gate staying off.
    @Test(arguments: configs.map(\.0))
    func mergeUnmergeAndSaveLoad(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        let (proj, root) = Self.toy(seed: 3)
        let w0 = proj.weight.copy()
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        var rng = GraftRNG(seed: 5)
        for (key, p) in adapter.peftStateDict where !key.contains("score") { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        let x = Tensor.randomNormal([3, 8], rng: &rng)
        let out = withNoGrad { proj.forward(x) }
        try model.merge("a")
        #expect(maxAbsDifference(withNoGrad { proj.forward(x) }, out) < 1e-5)
        try model.unmerge("a")
        #expect(maxAbsDifference(proj.weight, w0) < 1e-6)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-gate-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for score: Float in [0.8, -0.2] {
            try #require(Self.gate(adapter)).score.pointer[0] = score
            let expected = withNoGrad { proj.forward(x) }
            try model.saveAdapter("a", directory: dir)
            let (otherProj, otherRoot) = Self.toy(seed: 3)
            let loaded = try AdaptedModel(root: otherRoot).loadAdapter(directory: dir)
            #expect(loaded.config.peftType == adapter.config.peftType)
            #expect(Self.gate(loaded)?.isOn == (score >= 0.1))
            #expect(maxAbsDifference(withNoGrad { otherProj.forward(x) }, expected) < 1e-6, "\(method) score \(score)")
        }
    }
}
