import Foundation
import Testing
import Graft
import GraftTestSupport

/// MTLoRA: a shared LoRA plus per-task LoRAs chosen by each example's task id. The layer output against the
/// definition computed here, gradients through the task routing, per-task statistics, cached generation, a
/// two-task MiniLM fine-tune and the PEFT-layout round trip.
@Suite struct MTLoRATests {
    static func config(_ extra: [String: Any] = [:]) throws -> AdapterConfig {
        var json: [String: Any] = ["peft_type": "MTLORA", "r": 2, "lora_alpha": 4, "n_tasks": 3, "task_r": 3, "task_alpha": 6,
                                   "target_modules": ["q_proj", "v_proj", "down_proj"], "task_specific_modules": ["v_proj", "down_proj"]]
        json.merge(extra) { _, new in new }
        return try AdapterConfig(json: json, source: "mtlora")
    }

    @Test func layerMatchesTheDefinitionAndGradientsMatchFiniteDifferences() throws {
        let model = try MoEficationTests.tinyLlama()
        let adapted = AdaptedModel(root: model, methods: .all)
        let a = try adapted.addAdapter("mt", config: Self.config(), seed: 4)
        #expect(a.layers.count == 6)
        #expect(a.layers.filter { ($0.adapter as? MTLoRALayer)?.taskA != nil }.map(\.path).allSatisfy { !$0.contains("q_proj") })
        var rng = GraftRNG(seed: 9)
        for t in a.parameters { for i in 0..<t.count { t.pointer[i] += 0.3 * rng.nextNormal() } }

        // One v_proj layer, three examples of tasks 2, 0, 1: y = W x + b + (α/r) B A x + (α_t/r_t) B_τ A_τ x.
        let site = try #require(a.layers.first { $0.path.hasSuffix("0.self_attn.v_proj") })
        let layer = try #require(site.adapter as? MTLoRALayer)
        let ta = try #require(layer.taskA), tb = try #require(layer.taskB)
        try adapted.setTaskIDs([2, 0, 1])
        let x = Tensor.randomNormal([3, 4, site.linear.inFeatures], std: 1, rng: &rng)
        let y = withNoGrad { site.linear.forward(x) }.scalars
        let inF = site.linear.inFeatures, outF = site.linear.outFeatures, w = site.linear.weight.scalars
        let bias = site.linear.bias?.scalars ?? [Float](repeating: 0, count: outF)
        let sa = layer.sharedA.scalars, sb = layer.sharedB.scalars, pa = ta.scalars, pb = tb.scalars, xs = x.scalars
        var worst: Float = 0
        for (e, task) in [2, 0, 1].enumerated() {
            for t in 0..<4 {
                let row = Array(xs[((e * 4 + t) * inF)..<((e * 4 + t + 1) * inF)])
                let h = (0..<2).map { k in (0..<inF).reduce(Float(0)) { $0 + sa[k * inF + $1] * row[$1] } }
                let ht = (0..<3).map { k in (0..<inF).reduce(Float(0)) { $0 + pa[(task * 3 + k) * inF + $1] * row[$1] } }
                for o in 0..<outF {
                    var v = bias[o] + (0..<inF).reduce(Float(0)) { $0 + w[o * inF + $1] * row[$1] }
                    v += 2 * (0..<2).reduce(Float(0)) { $0 + sb[o * 2 + $1] * h[$1] }
                    v += 2 * (0..<3).reduce(Float(0)) { $0 + pb[(task * outF + o) * 3 + $1] * ht[$1] }
                    worst = worse(worst, abs(v - y[(e * 4 + t) * outF + o]))
                }
            }
        }
        print("MTLoRA layer vs its definition (3 examples of tasks 2, 0, 1): max |Δ| = \(worst)")
        #expect(worst <= 1e-4, "layer output differs from the definition by \(worst)")
        let stats = try #require(layer.routerStatistics.first)
        #expect(stats.dispatchedTokens == [4, 4, 4] && stats.meanEntropy == 0 && stats.path.hasSuffix(".mtlora_task"))

        // Gradients of every layer-0 parameter through the per-example task routing (examples of tasks 1 and 2).
        adapted.resetRouterStatistics()
        try adapted.setTaskIDs([1, 2])
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
        let probe = Tensor.randomNormal([2, 6, 32], std: 1, rng: &rng)
        sum(mul(try model.logits(batch), probe)).backward()
        let counted = adapted.routerStatistics(adapter: "mt")
        #expect(counted.count == 4 && counted.allSatisfy { $0.stats.dispatchedTokens == [0, 6, 6] }, "\(counted.map(\.stats.dispatchedTokens))")
        let params: [(key: String, tensor: Tensor)] = a.layers.filter { $0.path.hasPrefix("model.layers.0.") }
            .flatMap { l in (l.adapter as? MTLoRALayer)?.namedParameters.map { (key: "\(l.path).\($0.name)", tensor: $0.tensor) } ?? [] }
        #expect(params.count == 10, "q_proj shared only; v_proj and down_proj shared + task")
        let result = try finiteDifferenceCheck(params, step: 2e-3) { try RoutingFixtures.probed(model, batch, probe) }
        print("MTLoRA gradients (shared and task modules, layer 0): worst relative error \(result.worst)")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        // Task 0's modules took no part: their gradient is exactly zero.
        #expect(ta.grad.map { g in (0..<(3 * inF)).allSatisfy { g.pointer[$0] == 0 } } == true)

        // Cached generation for a task-1 prompt equals full passes; out-of-range ids and bad configs are refused.
        try adapted.setTaskIDs([1])
        let generated = try model.generate(prompt: [4, 8, 15, 16], parameters: GenerationParameters(maxNewTokens: 4, temperature: 0, stopTokens: []))
        #expect(generated == (try RoutingFixtures.greedyByFullPasses(model, prompt: [4, 8, 15, 16], steps: 4)))
        #expect(throws: GraftError.self) { try adapted.setTaskIDs([3]) }
        #expect(throws: GraftError.self) { try adapted.merge("mt") }
        for bad: [String: Any] in [["n_tasks": 0], ["task_r": 0], ["lora_dropout": 0.1], ["task_specific_modules": 3]] {
            #expect(throws: GraftError.self) { try adapted.addAdapter("bad", config: Self.config(bad)) }
        }
    }

    @Test func fineTunesTwoTasksOnMiniLMAndLoadsBackExactly() throws {
        // Task 0: the sentiment labels; task 1: "mentions a car" on the same 12 tweets (as the Poly test).
        let (classifier, examples) = try RoutingFixtures.twoTaskTweets(12)
        let model = AdaptedModel(root: classifier, methods: .all)
        let json: [String: Any] = ["peft_type": "MTLORA", "r": 4, "lora_alpha": 8, "n_tasks": 2, "task_r": 2, "task_alpha": 4,
                                   "target_modules": ["query", "value"], "task_specific_modules": #".*\.value"#,
                                   "modules_to_save": ["classifier"]]
        let a = try model.addAdapter("mt", config: AdapterConfig(json: json, source: "mtlora"), seed: 1)
        #expect(model.needsPaddedBatches, "examples of two tasks must not share a packed row")
        var config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 5e-3)
        config.epochs = 8
        let trainer = try Trainer(model: model, adapterName: "mt", objective: SequenceClassificationObjective(model: classifier), config: config)
        let before = try trainer.evaluate(examples).loss
        try trainer.train(examples, maxSteps: 8)
        let after = try trainer.evaluate(examples).loss
        let layers = a.layers.compactMap { $0.adapter as? MTLoRALayer }
        #expect(layers.count == 12 && layers.filter { $0.taskA != nil }.count == 6)
        // Both tasks' modules were trained: each task's examples reached its own B.
        var moved = [Float](repeating: 0, count: 2)
        for l in layers { if let b = l.taskB { for i in 0..<b.count { moved[i / (b.count / 2)] = worse(moved[i / (b.count / 2)], abs(b.pointer[i])) } } }
        let tokens = model.routerStatistics(adapter: "mt").map(\.stats.dispatchedTokens)
        print(String(format: "MTLoRA on MiniLM (shared r 4 on query+value, task r 2 on value, 2 tasks, %d trainable): loss %.4f -> %.4f in 8 steps on %d examples; task B moved %.4f / %.4f",
                     a.parameterCount, before, after, examples.count, moved[0], moved[1]))
        #expect(before.isFinite && after < before - 1e-3, "loss \(before) -> \(after)")
        #expect(moved.allSatisfy { $0 > 1e-4 }, "a task's modules did not move: \(moved)")
        #expect(tokens.allSatisfy { $0[0] > 0 && $0[1] > 0 }, "both task modules received tokens: \(tokens)")

        // PEFT layout round trip with per-example task ids.
        try model.setTaskIDs([0, 1])
        let batch = try PackedBatch(ArraySlice(examples.prefix(2)), padded: true)
        let logits = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-mtlora-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("mt", directory: dir)
        let saved = try String(contentsOfFile: dir + "/adapter_config.json", encoding: .utf8)
        #expect(saved.contains("MTLORA") && FileManager.default.fileExists(atPath: dir + "/adapter_model.safetensors"))
        try model.deleteAdapter("mt")
        try model.loadAdapter(directory: dir, name: "again")
        try model.setTaskIDs([0, 1])
        let again = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        let diff = worstOf(zip(logits, again).map { abs($0 - $1) }, empty: .nan)
        print("MTLoRA save/load round trip: max |Δ logits| = \(diff)")
        #expect(diff == 0, "the reloaded adapter gives other logits (max |Δ| \(diff))")
    }
}
