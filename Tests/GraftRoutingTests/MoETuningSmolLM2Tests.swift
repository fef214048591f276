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
        let trainer = try Trainer(model: adapted, adapterName: "esft", objective: CausalLMObjective(model: llama),
                                  config: .fullBatch(examples: examples.count, learningRate: 2e-4))
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        for _ in 0..<4 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
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
