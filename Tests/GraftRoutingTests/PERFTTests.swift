import Foundation
import Testing
import Graft
import GraftTestSupport

/// PERFT-R on a tiny random MoE base: routed LoRA experts beside the block's FFN experts. With B = 0 the block is
/// the MoE base exactly; gradients through the PEFT router and experts; router statistics; training; save/load.
@Suite struct PERFTTests {
    static func config(_ extra: [String: Any] = [:]) throws -> AdapterConfig {
        var json: [String: Any] = ["peft_type": "PERFT", "num_experts": 3, "top_k": 2, "r": 2, "lora_alpha": 4]
        json.merge(extra) { _, new in new }
        return try AdapterConfig(json: json, source: "perft")
    }

    @Test func withZeroBTheBlockIsTheMoEBaseAndGradientsMatchFiniteDifferences() throws {
        let model = try ESFTTests.moeBase()
        let block = try #require(model.moeBlocks.first)
        var rng = GraftRNG(seed: 6)
        let x = Tensor.randomNormal([2, 5, 16], std: 1, rng: &rng)
        let base = withNoGrad { block.forward(x) }.scalars
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]])
        let baseLogits = try withNoGrad { try model.logits(batch) }.scalars
        let adapted = AdaptedModel(root: model, methods: .all)
        let adapter = try adapted.addAdapter("perft", config: Self.config(), seed: 3)
        #expect(adapter.modules.count == 2 && adapter.parameterCount == 2 * (3 * 16 + 3 * 2 * 16 + 3 * 16 * 2))
        #expect(withNoGrad { block.forward(x) }.scalars == base, "B = 0 must leave the MoE block exactly as it was")
        #expect(try withNoGrad { try model.logits(batch) }.scalars == baseLogits)

        // Gradients of the PEFT router, A, B and the input through top-2 of 3 routing (renormalized gates too).
        for normalize in [false, true] {
            let layer = try #require(AdaptedModel(root: try ESFTTests.moeBase(), methods: .all)
                .addAdapter("p", config: Self.config(["normalize_gates": normalize]), seed: 4).modules.first?.adapter as? PERFTLayer)
            for i in 0..<layer.loraB.count { layer.loraB.pointer[i] = 0.5 * rng.nextNormal() }
            let xg = Tensor.randomNormal([7, 16], std: 1, rng: &rng).requiringGrad()
            let probe = Tensor.randomNormal([7, 16], std: 1, rng: &rng)
            sum(mul(layer.block.forward(xg), probe)).backward()
            let result = finiteDifferenceCheck([("x", xg), ("router", layer.router), ("lora_A", layer.loraA), ("lora_B", layer.loraB)],
                                               step: 1e-2, skipKinks: true) {
                let y = withNoGrad { layer.block.forward(xg) }
                return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
            }
            print("PERFT gradients (normalize_gates \(normalize)): worst relative error \(result.worst), \(result.kinks) kinks skipped")
            #expect(result.missing.isEmpty)
            #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
            #expect(result.kinks < 40, "\(result.kinks) entries skipped as kinks")
            #expect(layer.router.grad?.scalars.contains { $0 != 0 } == true, "the PEFT router gets a gradient")
            #expect(layer.block.routerWeight.grad == nil && layer.block.gateWeight.grad == nil, "the MoE block stays frozen")
        }
    }

    @Test func statisticsTrainingAndSaveLoad() throws {
        let model = try ESFTTests.moeBase()
        let adapted = AdaptedModel(root: model, methods: .all)
        let adapter = try adapted.addAdapter("perft", config: Self.config(), seed: 5)
        _ = try withNoGrad { try model.logits(try TokenBatch(sequences: [Array(0..<20).map(Int32.init)])) }
        let stats = adapted.routerStatistics()
        #expect(stats.count == 2 && stats.allSatisfy { $0.adapter == "perft" })
        for (_, s) in stats {
            #expect(s.tokens == 20 && s.dispatchedTokens.reduce(0, +) == 40, "top-2 of 3: 2 selections per token")
            #expect(abs(s.load.reduce(0, +) - 1) < 1e-9 && s.meanEntropy > 0 && s.meanEntropy <= log(3.0) + 1e-6)
            #expect(s.overflowCount == 0 && s.path.hasSuffix(".mlp.peft_experts"))
        }
        adapted.resetRouterStatistics()
        #expect(adapted.routerStatistics().allSatisfy { $0.stats.tokens == 0 })
        #expect(try adapted.routerStatisticsJSON().contains("mlp.peft_experts"))

        let examples = MoEficationTests.sequences(6, length: 14, seed: 7).map {
            TokenizedExample(ids: $0, targets: Array($0.dropFirst()) + [-100])
        }
        let trainer = try Trainer(model: adapted, adapterName: "perft", objective: CausalLMObjective(model: model),
                                  config: .fullBatch(examples: examples.count, learningRate: 2e-2))
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        for _ in 0..<5 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
        print(String(format: "PERFT tiny MoE: loss %.4f -> %.4f in 5 steps (%d trainable)", before, after, adapter.parameterCount))
        #expect(before.isFinite && after < before - 1e-3)
        #expect(throws: GraftError.self) { try adapted.merge("perft") }

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-perft-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try adapted.saveAdapter("perft", directory: dir)
        let reloaded = try ESFTTests.moeBase()
        let loaded = try AdaptedModel(root: reloaded, methods: .all).loadAdapter(directory: dir, name: "perft")
        for (a, b) in zip(adapter.peftStateDict, loaded.peftStateDict) {
            #expect(a.key == b.key && a.tensor.scalars == b.tensor.scalars, "\(a.key)")
        }
        let tokens = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        #expect(try withNoGrad { try model.logits(tokens).scalars } == withNoGrad { try reloaded.logits(tokens).scalars })
        let out = try reloaded.generate(prompt: [4, 8, 15], parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
        #expect(out.count == 6 && out.allSatisfy { (0..<32).contains($0) })
        // A dense model and a config of another shape are refused by name.
        let dense = try #require(throws: GraftError.self) {
            try AdaptedModel(root: try MoEficationTests.tinyLlama(), methods: .all).loadAdapter(directory: dir)
        }
        #expect(dense.message.contains("MoE"), "\(dense.message)")
        #expect(throws: GraftError.self) { try AdaptedModel(root: try ESFTTests.moeBase(), methods: .all).addAdapter("x", config: Self.config(["r": 0])) }
    }
}
