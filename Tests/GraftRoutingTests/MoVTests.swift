import Foundation
import Testing
import Graft
import GraftTestSupport

/// MoV, a soft mixture of (IA)³ vector experts: with one expert it is (IA)³; gradients through the router and the
/// vectors; router statistics; a MiniLM fine-tune (MoV is not tied to MoE bases) and save/load.
@Suite struct MoVTests {
    static let targets = ["k_proj", "v_proj", "down_proj"]

    static func config(experts: Int, initOnes: Bool = true) throws -> AdapterConfig {
        try AdapterConfig(json: ["peft_type": "MOV", "num_experts": experts, "target_modules": targets,
                                 "feedforward_modules": ["down_proj"], "init_ia3_weights": initOnes], source: "mov")
    }

    @Test func oneExpertIsIA3() throws {
        let model = try MoEficationTests.tinyLlama()
        let adapted = AdaptedModel(root: model, methods: .all)
        let mov = try adapted.addAdapter("mov", config: Self.config(experts: 1, initOnes: false), seed: 2)
        let ia3 = try adapted.addAdapter("ia3", config: AdapterConfig(json: ["peft_type": "IA3", "target_modules": Self.targets,
                                                                             "feedforward_modules": ["down_proj"]], source: "ia3"))
        // (IA)³ takes MoV's single vector per layer.
        for (m, i) in zip(mov.layers, ia3.layers) {
            let v = try #require((m.adapter as? MoVLayer)?.vectors), s = try #require((i.adapter as? IA3Layer)?.scale)
            #expect(v.count == s.count && m.path == i.path)
            s.pointer.update(from: v.pointer, count: v.count)
        }
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]])
        try adapted.setActiveAdapter("mov")
        let withMoV = try withNoGrad { try model.logits(batch) }.scalars
        try adapted.setActiveAdapter("ia3")
        let withIA3 = try withNoGrad { try model.logits(batch) }.scalars
        adapted.setAdaptersDisabled(true)
        let base = try withNoGrad { try model.logits(batch) }.scalars
        let diff = worstOf(zip(withMoV, withIA3).map { abs($0 - $1) }, empty: .nan)
        let effect = worstOf(zip(withIA3, base).map { abs($0 - $1) }, empty: .nan)
        print("MoV with one expert vs (IA)³ with its vector: max |Δ logits| = \(diff) (the vectors move the logits by \(effect))")
        #expect(diff <= 1e-6, "MoV with one expert differs from (IA)³ by \(diff)")
        #expect(effect > 1e-2)
    }

    @Test func gradientsMatchFiniteDifferencesAndStatisticsAreCounted() throws {
        let model = try MoEficationTests.tinyLlama()
        let adapted = AdaptedModel(root: model, methods: .all)
        let a = try adapted.addAdapter("mov", config: Self.config(experts: 3), seed: 4)
        #expect(a.layers.count == 6)
        var rng = GraftRNG(seed: 9)
        for t in a.parameters { for i in 0..<t.count { t.pointer[i] += 0.3 * rng.nextNormal() } }
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        let probe = Tensor.randomNormal([1, 8, 32], std: 1, rng: &rng)
        adapted.resetRouterStatistics()
        sum(mul(try model.logits(batch), probe)).backward()
        let stats = adapted.routerStatistics()
        #expect(stats.count == 6)
        for (_, s) in stats {
            #expect(s.tokens == 8 && s.dispatchedTokens == [8, 8, 8], "soft routing sends every token to every expert")
            #expect(abs(s.load.reduce(0, +) - 1) < 1e-9 && s.meanEntropy > 0 && s.meanEntropy <= log(3.0) + 1e-6)
        }
        // Layer 0's key (output-scaling) and down_proj (input-scaling) routers and vectors.
        let params = a.layers.filter { $0.path.hasPrefix("model.layers.0.") && !$0.path.contains("v_proj") }
            .flatMap { l in (l.adapter as? MoVLayer).map { [("\(l.path).router", $0.router), ("\(l.path).mov_l", $0.vectors)] } ?? [] }
        #expect(params.count == 4)
        let result = try finiteDifferenceCheck(params, step: 1e-2) { try RoutingFixtures.probed(model, batch, probe) }
        print("MoV gradients (router and vectors, key and FFN sites): worst relative error \(result.worst)")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        // Generation with the KV cache routes each new token as a full pass over the sequence would.
        let generated = try model.generate(prompt: [4, 8, 15, 16], parameters: GenerationParameters(maxNewTokens: 5, temperature: 0, stopTokens: []))
        let full = try RoutingFixtures.greedyByFullPasses(model, prompt: [4, 8, 15, 16], steps: 5)
        #expect(generated == full, "cached generation \(generated) vs full passes \(full)")
        #expect(throws: GraftError.self) { try adapted.merge("mov") }
        #expect(throws: GraftError.self) {
            try adapted.addAdapter("bad", config: AdapterConfig(json: ["peft_type": "MOV", "num_experts": 0, "target_modules": ["k_proj"]], source: "bad"))
        }
    }

    @Test func fineTunesMiniLMAndLoadsBackExactly() throws {
        let (classifier, examples) = try RoutingFixtures.tweetClassification(16)
        let model = AdaptedModel(root: classifier, methods: .all)
        // The paper's sites: keys, values and the FFN's intermediate activation (the input of layer.N.output.dense).
        let ffn = #".*layer\.[0-9]+\.output\.dense"#
        let json: [String: Any] = ["peft_type": "MOV", "num_experts": 4, "target_modules": #".*\.(key|value)|"# + ffn,
                                   "feedforward_modules": ffn, "modules_to_save": ["classifier"]]
        let a = try model.addAdapter("mov", config: AdapterConfig(json: json, source: "mov"), seed: 1)
        let trainer = try Trainer(model: model, adapterName: "mov", objective: SequenceClassificationObjective(model: classifier),
                                  config: .fullBatch(examples: examples.count, learningRate: 1e-2))
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        for _ in 0..<8 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
        let moved = a.layers.compactMap { ($0.adapter as? MoVLayer)?.vectors }.map { v in worstOf(v.scalars.map { abs($0 - 1) }, empty: .nan) }
        print(String(format: "MoV on MiniLM (4 experts on key, value, FFN + classifier, %d trainable): loss %.4f -> %.4f in 8 steps on 16 tweets; vectors moved up to %.4f",
                     a.parameterCount, before, after, worstOf(moved, empty: .nan)))
        #expect(before.isFinite && after < before - 1e-3, "loss \(before) -> \(after)")
        #expect(a.layers.count == 18, "key, value and the FFN output of 6 layers")
        #expect(a.layers.filter { ($0.adapter as? MoVLayer)?.isFeedForward == true }.count == 6)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-mov-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let logits = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        try model.saveAdapter("mov", directory: dir)
        try model.deleteAdapter("mov")
        try model.loadAdapter(directory: dir, name: "again")
        let again = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        #expect(logits == again, "the reloaded adapter gives other logits")
    }
}
