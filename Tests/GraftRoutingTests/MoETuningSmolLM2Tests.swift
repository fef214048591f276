import Foundation
import Testing
import Graft
import GraftTestSupport

/// Tuning SmolLM2 made an MoE base (MoEfication, E = 8, top-4; made once for both methods): ESFT, with the experts
/// the demo-tweet completions route to most selected by the token criterion, and PERFT-R's routed LoRA experts
/// each lower the causal-LM loss in a few full-batch steps.
@Suite(.serialized) struct MoETuningSmolLM2Tests {
    @Test func esftAndPERFTOnMoEfiedSmolLM2LowerTheLoss() throws {
        let (llama, tokenizer, examples) = try smolLM2TweetCompletions()
        let tweets = try TweetCorpus.load(path: try Assets.require(Assets.tweets)).train.map(\.text)
        let calibration = tweets.prefix(200).map { Array(tokenizer.encode($0).prefix(48)) }
        var options = MoEficationOptions()
        options.experts = 8
        options.topK = 4
        options.maxTokens = 512
        try MoEfication.apply(to: llama, sequences: calibration, options: options)
        let config = try ESFT.configuration(model: llama, sequences: examples.map(\.ids), score: .token, topP: 0.2)
        let selected = try #require(config["experts"] as? [String: [Int]])
        let counts = selected.values.map(\.count)
        #expect(counts.count == 30 && counts.allSatisfy { (1...8).contains($0) })
        let adapted = AdaptedModel(root: llama, methods: .all)
        let adapter = try adapted.addAdapter("esft", config: AdapterConfig(json: config, source: "esft"), seed: 1)
        let (before, after) = try fullBatchLosses(adapted, adapter: "esft", model: llama, examples: examples, learningRate: 2e-4, steps: 4)
        print(String(format: "ESFT on SmolLM2 E=8 k=4 (token score, top_p 0.2: %.2f experts per layer, %d trainable): loss %.4f -> %.4f in 4 steps on 8 demo tweets",
                     Double(counts.reduce(0, +)) / 30, adapter.parameterCount, before, after))
        #expect(before.isFinite && after < before - 1e-3, "ESFT: the loss went \(before) -> \(after)")
        try adapted.deleteAdapter("esft")

        let perft = try adapted.addAdapter("perft", config: AdapterConfig(json: ["peft_type": "PERFT", "num_experts": 4, "top_k": 2, "r": 4,
                                                                             "lora_alpha": 8], source: "perft"), seed: 1)
        let perftTrainer = try Trainer(model: adapted, adapterName: "perft", objective: CausalLMObjective(model: llama),
                                       config: .fullBatch(examples: examples.count, learningRate: 1e-3))
        let perftBefore = try perftTrainer.evaluate(examples).loss
        #expect(abs(perftBefore - before) < 1e-4, "a new PERFT adapter (B = 0) is the MoE base: \(perftBefore) vs \(before)")
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        for _ in 0..<4 {
            _ = try perftTrainer.accumulate(batch)
            _ = try perftTrainer.optimizerStep(totalSteps: 1 << 20)
        }
        adapted.resetRouterStatistics()
        let perftAfter = try perftTrainer.evaluate(examples).loss
        let stats = adapted.routerStatistics()
        let entropy = stats.map(\.stats.meanEntropy).reduce(0, +) / Double(max(stats.count, 1))
        print(String(format: "PERFT-R on SmolLM2 E=8 k=4 (4 LoRA experts r4, top-2, %d trainable): loss %.4f -> %.4f in 4 steps; PEFT routers' mean entropy %.3f nats (log 4 = 1.386)",
                     perft.parameterCount, perftBefore, perftAfter, entropy))
        #expect(stats.count == 30)
        #expect(perftBefore.isFinite && perftAfter < perftBefore - 1e-3, "PERFT: the loss went \(perftBefore) -> \(perftAfter)")
    }
}

/// New-domain partial LoRA (seed #96) on SmolLM2 upcycled in its last four layers (E = 2 copies of the FFN,
/// top-1): the domain is the upper part of the vocabulary (ids ≥ 10,000). Training on the demo tweets lowers their
/// loss, while a text whose tokens all lie below 10,000, and every position before a text's first domain token,
/// keep the base model's logits bit for bit.
@Suite(.serialized) struct MoEPartialLoRASmolLM2Tests {
    @Test func partialLoRATrainsTheDomainAndLeavesOtherTokensExact() throws {
        let (llama, tokenizer, examples) = try smolLM2TweetCompletions()
        var options = MoEUpcyclingOptions()
        options.experts = 2
        options.topK = 1
        options.layers = [26, 27, 28, 29]
        try MoEUpcycling.apply(to: llama, options: options)
        let plain = tokenizer.encode("the cat sat on the mat and the dog")
        #expect(plain.allSatisfy { $0 < 10_000 } && plain.count >= 8, "\(plain)")
        let mixed = try #require(examples.first?.ids)
        let firstDomain = try #require(mixed.firstIndex { $0 >= 10_000 })
        let vocab = llama.config.vocabSize
        let basePlain = try withNoGrad { try llama.logits(TokenBatch(sequences: [plain])) }.scalars
        let baseMixed = try withNoGrad { try llama.logits(TokenBatch(sequences: [mixed])) }.scalars
        let adapted = AdaptedModel(root: llama, methods: .all)
        let adapter = try adapted.addAdapter("plora", config: AdapterConfig(json: ["peft_type": "MOE_PLORA", "r": 4, "lora_alpha": 8,
                                                                                "domain_token_ranges": [[10_000, vocab - 1]]], source: "plora"), seed: 1)
        let (before, after) = try fullBatchLosses(adapted, adapter: "plora", model: llama, examples: examples, learningRate: 2e-3, steps: 4)
        let layers = adapter.modules.compactMap { $0.adapter as? MoEPartialLoRALayer }
        let domainCount: Int = layers.reduce(0) { $0 + $1.domainTokens.reduce(0, +) }
        let otherCount: Int = layers.reduce(0) { $0 + $1.otherTokens.reduce(0, +) }
        let domainShare = Double(domainCount) / Double(max(1, domainCount + otherCount))
        print(String(format: "MOE_PLORA on SmolLM2 upcycled layers 26-29 (E=2, top-1, r4, %d trainable): loss %.4f -> %.4f in 4 steps on 8 demo tweets; %.1f%% of dispatched tokens were domain tokens",
                     adapter.parameterCount, before, after, 100 * domainShare))
        #expect(before.isFinite && after < before - 1e-2, "MOE_PLORA: the loss went \(before) -> \(after)")
        let plainAfter = try withNoGrad { try llama.logits(TokenBatch(sequences: [plain])) }.scalars
        let mixedAfter = try withNoGrad { try llama.logits(TokenBatch(sequences: [mixed])) }.scalars
        #expect(plainAfter == basePlain, "a text without domain tokens keeps the base model's logits")
        #expect(Array(mixedAfter[..<(firstDomain * vocab)]) == Array(baseMixed[..<(firstDomain * vocab)]),
                "positions before the first domain token keep the base model's logits")
        #expect(zip(mixedAfter[(firstDomain * vocab)...], baseMixed[(firstDomain * vocab)...]).contains { $0 != $1 })
    }
}

/// The loss of `examples` before and after `steps` full-batch steps of adapter `name` of `adapted` at
/// `learningRate` under the causal-LM objective of `model`.
func fullBatchLosses(_ adapted: AdaptedModel, adapter name: String, model: LlamaModel, examples: [TokenizedExample],
                            learningRate: Float, steps: Int) throws -> (before: Double, after: Double) {
    let trainer = try Trainer(model: adapted, adapterName: name, objective: CausalLMObjective(model: model),
                              config: .fullBatch(examples: examples.count, learningRate: learningRate))
    let before = try trainer.evaluate(examples).loss
    let batch = try PackedBatch(ArraySlice(examples), padded: false)
    for _ in 0..<steps {
        _ = try trainer.accumulate(batch)
        _ = try trainer.optimizerStep(totalSteps: 1 << 20)
    }
    return (before, try trainer.evaluate(examples).loss)
}
