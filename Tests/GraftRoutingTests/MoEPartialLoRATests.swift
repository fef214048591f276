import Foundation
import Testing
import Graft
import GraftTestSupport

/// New-domain partial LoRA on the experts of a tiny random MoE base (seed #96): tokens outside the domain run the
/// frozen experts exactly, before and after training; gradients through the adapted experts; the domain's routing
/// counted per expert; save/load, generation and refusals.
@Suite struct MoEPartialLoRATests {
    /// The new domain: token ids 24...31 of the tiny model's 32.
    static func config(_ extra: [String: Any] = [:]) throws -> AdapterConfig {
        var json: [String: Any] = ["peft_type": "MOE_PLORA", "r": 2, "lora_alpha": 4, "domain_token_ranges": [[24, 31]]]
        json.merge(extra) { _, new in new }
        return try AdapterConfig(json: json, source: "plora")
    }

    static func randomizeB(_ adapter: NamedAdapter, seed: UInt64) throws {
        var rng = GraftRNG(seed: seed)
        for (_, m) in adapter.modules {
            let layer = try #require(m as? MoEPartialLoRALayer)
            for b in [layer.gateB, layer.upB, layer.downB] { for i in 0..<b.count { b.pointer[i] = 0.3 * rng.nextNormal() } }
        }
    }

    @Test func tokensOutsideTheDomainRunTheBaseAndGradientsMatchFiniteDifferences() throws {
        let model = try ESFTTests.moeBase()
        let plain = [[Int32]]([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8]])
        let mixed = [[Int32]]([[3, 1, 25, 1, 5, 30, 2, 6]])
        let base = try withNoGrad { try model.logits(try TokenBatch(sequences: plain)) }.scalars
        let baseMixed = try withNoGrad { try model.logits(try TokenBatch(sequences: mixed)) }.scalars
        let adapted = AdaptedModel(root: model, methods: .all)
        let adapter = try adapted.addAdapter("plora", config: Self.config(), seed: 3)
        let e = 4, m = model.moeBlocks[0].expertSize, h = 16
        #expect(adapter.modules.count == 2 && adapter.parameterCount == 2 * e * 3 * (2 * h + 2 * m))
        // B = 0 is the base (the domain tokens' experts then run as a second GEMM, so up to rounding).
        let zeroB = try withNoGrad { try model.logits(try TokenBatch(sequences: mixed)) }.scalars
        let scale = Double(baseMixed.map { abs($0) }.max() ?? 1)
        #expect(zip(zeroB, baseMixed).allSatisfy { abs(Double($0) - Double($1)) <= 1e-5 * scale })
        let layers = adapter.modules.compactMap { $0.adapter as? MoEPartialLoRALayer }
        for layer in layers { layer.resetCounts() }
        try Self.randomizeB(adapter, seed: 4)
        #expect(try withNoGrad { try model.logits(try TokenBatch(sequences: plain)) }.scalars == base,
                "a sequence without domain tokens computes the base model exactly")
        let changed = try withNoGrad { try model.logits(try TokenBatch(sequences: mixed)) }.scalars
        // Positions before the first domain token (0, 1) are the base's (up to rounding: the other tokens' experts
        // run as a GEMM of fewer rows); from the first domain token on they differ.
        let vocab = 32
        #expect(zip(changed[0..<(2 * vocab)], baseMixed[0..<(2 * vocab)]).allSatisfy { abs(Double($0) - Double($1)) <= 1e-5 * scale })
        #expect(zip(changed[(2 * vocab)...], baseMixed[(2 * vocab)...]).contains { abs($0 - $1) > 1e-4 })
        // The mixed pass saw 2 domain tokens of 8 (the plain pass none), each dispatched to top-2 of 4 experts.
        for layer in layers {
            #expect(layer.domainTokens.reduce(0, +) == 2 * 2 && layer.otherTokens.reduce(0, +) == 6 * 2,
                    "\(layer.domainTokens) \(layer.otherTokens)")
        }
        // The same counts through the statistics API: one domain-pathway entry per MoE block.
        let stats = adapted.routerStatistics(adapter: "plora").map(\.stats)
        #expect(stats.map(\.path) == model.moeBlocks.map { $0.path + ".experts.plora_domain" })
        for (s, layer) in zip(stats, layers) {
            #expect(s.tokens == 2 && s.forwardPasses == 1 && s.dispatchedTokens == layer.domainTokens,
                    "tokens \(s.tokens), passes \(s.forwardPasses), dispatched \(s.dispatchedTokens) vs \(layer.domainTokens)")
            #expect(abs(s.load.reduce(0, +) - 1) < 1e-12 && abs(s.tokenFraction.reduce(0, +) - 2) < 1e-12, "top-2: \(s.tokenFraction)")
        }
        adapted.resetRouterStatistics(adapter: "plora")
        #expect(layers.allSatisfy { $0.domainTokens.allSatisfy { $0 == 0 } && $0.domainTokenCount == 0 })

        // Gradients of every factor and of the input through the block, on a pass with domain tokens marked.
        let layer = try #require(layers.first)
        let ids: [Int32] = [3, 25, 4, 27, 5, 9, 31]
        layer.domainGate.willRun(try TokenBatch(sequences: [ids]), caches: [nil])
        var rng = GraftRNG(seed: 5)
        let xg = Tensor.randomNormal([7, h], std: 1, rng: &rng).requiringGrad()
        let probe = Tensor.randomNormal([7, h], std: 1, rng: &rng)
        sum(mul(layer.block.forward(xg), probe)).backward()
        let params = [("x", xg)] + layer.namedParameters.map { ($0.name, $0.tensor) }
        let result = finiteDifferenceCheck(params, step: 1e-2, skipKinks: true) {
            let y = withNoGrad { layer.block.forward(xg) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        print("MOE_PLORA gradients: worst relative error \(result.worst), \(result.kinks) kinks skipped")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        #expect(result.kinks < 40, "\(result.kinks) entries skipped as kinks")
        #expect(layer.block.gateWeight.grad == nil && layer.block.routerWeight.grad == nil, "the MoE base stays frozen")
    }

    @Test func trainingLeavesTheOldDomainExactAndSavesAndLoads() throws {
        let model = try ESFTTests.moeBase()
        let adapted = AdaptedModel(root: model, methods: .all)
        let adapter = try adapted.addAdapter("plora", config: Self.config(), seed: 5)
        let plain = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
        let before = try withNoGrad { try model.logits(plain) }.scalars
        // New-domain text: sequences over ids 24...31 with a fixed successor pattern.
        var rng = GraftRNG(seed: 8)
        let examples = (0..<6).map { _ -> TokenizedExample in
            let start = Int32(rng.next() % 8)
            let ids = (0..<14).map { 24 + (start + 3 * Int32($0)) % 8 }
            return TokenizedExample(ids: ids, targets: Array(ids.dropFirst()) + [-100])
        }
        let trainer = try Trainer(model: adapted, adapterName: "plora", objective: CausalLMObjective(model: model),
                                  config: .fullBatch(examples: examples.count, learningRate: 2e-2))
        let lossBefore = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        for _ in 0..<8 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let lossAfter = try trainer.evaluate(examples).loss
        print(String(format: "MOE_PLORA tiny MoE: domain loss %.4f -> %.4f in 8 steps (%d trainable)", lossBefore, lossAfter,
                     adapter.parameterCount))
        #expect(lossBefore.isFinite && lossAfter < lossBefore - 1e-2)
        #expect(try withNoGrad { try model.logits(plain) }.scalars == before, "the old domain is untouched by training")
        #expect(throws: GraftError.self) { try adapted.merge("plora") }

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-plora-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try adapted.saveAdapter("plora", directory: dir)
        let reloaded = try ESFTTests.moeBase()
        let loaded = try AdaptedModel(root: reloaded, methods: .all).loadAdapter(directory: dir, name: "plora")
        for (a, b) in zip(adapter.peftStateDict, loaded.peftStateDict) {
            #expect(a.key == b.key && a.tensor.scalars == b.tensor.scalars, "\(a.key)")
        }
        let tokens = try TokenBatch(sequences: [[3, 25, 4, 28, 5, 9, 2, 30]])
        #expect(try withNoGrad { try model.logits(tokens).scalars } == withNoGrad { try reloaded.logits(tokens).scalars })
        // Cached generation marks each new token by its id: the same tokens as generation without a cache.
        let prompt: [Int32] = [24, 27, 30]
        let out = try reloaded.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
        #expect(out == (try uncachedGreedy(reloaded, prompt: prompt, steps: 6)))

        // Refusals by name: a dense model, an id outside the vocabulary, no domain, a malformed range.
        let dense = try #require(throws: GraftError.self) {
            try AdaptedModel(root: try MoEficationTests.tinyLlama(), methods: .all).loadAdapter(directory: dir)
        }
        #expect(dense.message.contains("MoE"), "\(dense.message)")
        for (extra, needle) in [(["domain_token_ids": [40]], "40"), (["domain_token_ranges": NSNull()], "domain_token"),
                                (["domain_token_ranges": [[5, 2]]], "[5, 2]"), (["r": 0], "'r'")] as [([String: Any], String)] {
            let error = try #require(throws: GraftError.self) {
                try AdaptedModel(root: try ESFTTests.moeBase(), methods: .all).addAdapter("x", config: Self.config(extra))
            }
            #expect(error.message.contains(needle), "\(error.message)")
        }
        // Deleting the adapter removes its token observer and its layers: the model is the base again.
        let base = try withNoGrad { try ESFTTests.moeBase().logits(tokens) }.scalars
        try adapted.deleteAdapter("plora")
        #expect(model.tokenObservers.isEmpty && model.moeBlocks.allSatisfy { $0.adapters.isEmpty })
        #expect(try withNoGrad { try model.logits(tokens) }.scalars == base)
    }
}
