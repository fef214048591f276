import Foundation
import Graft
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport
import GraftTrain

/// LoRA's `trainable_token_indices` on SmolLM2, whose lm_head is tied to embed_tokens: PEFT ties the trained rows
/// into the head, so a listed token's logit uses its trained row. Checked against PEFT
/// (scripts/fixtures/peft-smollm2-lora-options.py, case `lora_trainable_tokens_tied`), then merged, saved, and
/// trained with finite-difference gradients through both uses of the rows.
@Suite(.serialized) struct TiedTrainableTokensTests {
    static let root = "peft-smollm2-lora-options/lora_trainable_tokens_tied"
    static let columns = 512

    func expected() throws -> SafeTensorsFile { try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/expected.safetensors")) }

    func logits(_ llama: LlamaModel, _ batch: TokenBatch) throws -> Tensor { try firstLogitColumns(llama, batch) }

    @Test func logitsAndGenerationMatchPEFT() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        #expect(llama.tiedHead)
        let model = AdaptedModel(root: llama)
        let adapter = try model.loadAdapter(directory: Assets.fixture(Self.root))
        let file = try expected()
        let batch = try fixtureBatch(file)
        let want = try file.tensor("logits_first\(Self.columns)")
        let out = try logits(llama, batch)
        let error = maxAbsDifference(out, want)
        #expect(llama.lmHead.adapters.contains { $0 is TiedHeadTokens }, "the tied head shares the trained rows")
        // Without the head's share only the embedding side acts: PEFT's logits are then far off.
        let headSide = llama.lmHead.adapters
        llama.lmHead.adapters.removeAll()
        let embeddingOnly = maxAbsDifference(try logits(llama, batch), want)
        llama.lmHead.adapters = headSide
        // The rows move the logits by up to 16.6 (manifest), so the bound is 1e-5 of the output's max-abs.
        let bound = max(1e-4, 1e-5 * worstOf(UnsafeBufferPointer(start: want.pointer, count: want.count).map(abs), empty: 0))
        print("tied trainable tokens: max-abs error vs PEFT \(error) (bound \(bound)); \(embeddingOnly) without the head's share; \(adapter.parameterCount) trainable")
        #expect(error <= bound, "logits differ from PEFT's by \(error)")
        #expect(embeddingOnly > 0.1, "the fixture must show the head's share of the rows (\(embeddingOnly))")
        #expect(adapter.parameterCount == 4608)

        let prompt = try file.int64s("generate_prompt").map { Int32($0) }
        let tokens = try file.int64s("generate_tokens").map { Int32($0) }
        let generated = try llama.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: tokens.count))
        #expect(generated == tokens, "generated \(generated), PEFT \(tokens)")
    }

    @Test func mergesSavesAndReloadsAsPEFTDoes() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        try model.loadAdapter(directory: Assets.fixture(Self.root))
        let batch = try fixtureBatch(try expected())
        let before = try logits(llama, batch)
        try model.merge("default")
        let merged = maxAbsDifference(try logits(llama, batch), before)
        try model.unmerge("default")
        let unmerged = maxAbsDifference(try logits(llama, batch), before)
        // Merging decodes the quantized table (and so the tied head) to float32 for good: products round differently.
        // The bound is the decoder fixtures' 1e-5 of the largest logit (≈ 3.5e-4 here); an absolute 1e-4 failed at
        // 1.09e-4 on an AVX2-only CPU.
        let scale = worstOf(before.scalars.map(abs), empty: 0)
        print("tied trainable tokens: merged differs by \(merged), unmerged by \(unmerged), logits up to \(scale)")
        #expect(merged <= 1e-5 * scale && unmerged <= 1e-5 * scale, "merged \(merged), unmerged \(unmerged), bound \(1e-5 * scale)")
        #expect(llama.embedTokens.compactWeight == nil && llama.lmHead.compactWeight == nil)

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-tied-tokens-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        try model.deleteAdapter("default")
        #expect(llama.lmHead.adapters.isEmpty && llama.embedTokens.adapters.isEmpty)
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let original = try SafeTensorsFile(contentsOf: Assets.fixture("\(Self.root)/adapter_model.safetensors"))
        #expect(Set(saved.names) == Set(original.names), "\(saved.names)")
        for name in original.names { #expect(saved.info(name)?.shape == original.info(name)?.shape, "\(name)") }
        try AdaptedModel(root: llama).loadAdapter(directory: dir)
        // The merge above left the table decoded to float32, so the reloaded model rounds as the merged one did.
        let reloaded = maxAbsDifference(try logits(llama, batch), before)
        #expect(reloaded <= 1e-5 * scale, "reloaded \(reloaded), bound \(1e-5 * scale)")
    }

    /// `ensure_weight_tying` (set or not) ties the rows into the head; an untied target table does not.
    @Test func tiesWithOrWithoutEnsureWeightTying() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        try model.addAdapter("t", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                                               "ensure_weight_tying": true, "trainable_token_indices": [5, 9]], source: "tying"))
        #expect(llama.lmHead.adapters.count == 1)
        let bert = try Assets.loadMiniLM()
        try AdaptedModel(root: bert).addAdapter("t", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["query"],
                                                                                  "trainable_token_indices": [101]], source: "untied"))
    }

    /// The causal-LM loss's gradient with respect to the rows (used by the embedding and by the head) and the LoRA
    /// matrices matches central differences; a few steps lower the loss and move only the listed rows.
    @Test func trainsThroughBothUsesOfTheRows() throws {
        let (llama, tokenizer, examples) = try smolLM2TweetCompletions(count: 2)
        let label = tokenizer.encode(" positive", addSpecialTokens: false) + tokenizer.encode(" negative", addSpecialTokens: false)
        let inInput = Array(examples[0].ids.prefix(3))
        let ids = Array(Set(label + inInput)).sorted()
        let model = AdaptedModel(root: llama)
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: [
            "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "layers_to_transform": [0],
            "trainable_token_indices": ids.map(Int.init), "task_type": "CAUSAL_LM"], source: "tied"), seed: 3)
        let rows = try #require(adapter.modules.compactMap { $0.adapter as? TrainableTokensLayer }.first)
        for i in 0..<rows.rows.count { rows.rows.pointer[i] += Float(randomValues(1, seed: UInt64(i))[0]) * 0.05 }
        let objective = CausalLMObjective(model: llama)
        let batch = try PackedBatch(ArraySlice(examples), padded: model.needsPaddedBatches)
        let params = adapter.peftStateDict.map { (key: $0.key, tensor: $0.tensor) }
        for p in params { p.tensor.grad = nil }
        let loss = try objective.loss(batch)
        #expect(loss.item > 0.1, "the batch has completion targets (\(loss.item))")
        loss.backward()
        let check = try finiteDifferenceCheck(params, step: 1e-2, samples: 6, report: 2e-2) {
            Double(try withNoGrad { try objective.loss(batch) }.item)
        }
        print("tied trainable tokens: worst gradient error \(check.worst), missing \(check.missing)")
        #expect(check.worst.isFinite && check.worst < 2e-2 && check.missing.isEmpty)

        let config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 1e-2)
        let trainer = try Trainer(model: model, adapterName: "default", objective: objective, config: config)
        let tableBefore = llama.embedTokens.baseRows([0, 7])
        let before = try trainer.evaluate(examples).loss
        for _ in 0..<4 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
        print("tied trainable tokens: fine-tune loss \(before) -> \(after)")
        #expect(before.isFinite && after < before - 1e-3)
        #expect(maxAbsDifference(llama.embedTokens.baseRows([0, 7]), tableBefore) == 0, "the table itself stays frozen")
    }
}
