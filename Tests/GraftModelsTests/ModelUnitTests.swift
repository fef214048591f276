import Foundation
import Testing
@testable import GraftModels
@testable import GraftTensor
import GraftTestSupport

@Suite struct ModelUnitTests {
    @Test func ggufNamesMapToHuggingFaceNames() {
        #expect(LlamaModel.huggingFaceName(forGGUF: "blk.0.attn_q.weight") == "model.layers.0.self_attn.q_proj.weight")
        #expect(LlamaModel.huggingFaceName(forGGUF: "blk.29.ffn_down.weight") == "model.layers.29.mlp.down_proj.weight")
        #expect(LlamaModel.huggingFaceName(forGGUF: "blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight")
        #expect(LlamaModel.huggingFaceName(forGGUF: "blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight")
        #expect(LlamaModel.huggingFaceName(forGGUF: "token_embd.weight") == "model.embed_tokens.weight")
        #expect(LlamaModel.huggingFaceName(forGGUF: "output_norm.weight") == "model.norm.weight")
        #expect(LlamaModel.huggingFaceName(forGGUF: "blk.x.attn_q.weight") == nil)
    }

    @Test func ropeRowUnpermutationInvertsTheConverter() {
        // The converter maps HF row h·d + j·d/2 + i to GGUF row h·d + 2i + j; rows carry their HF index.
        let heads = 2, d = 4, cols = 1
        var gguf = [Float](repeating: 0, count: heads * d)
        for h in 0..<heads { for j in 0..<2 { for i in 0..<(d / 2) { gguf[h * d + 2 * i + j] = Float(h * d + j * d / 2 + i) } } }
        let w = LlamaModel.unpermuteRoPERows(Tensor(shape: [heads * d, cols], values: gguf), heads: heads)
        #expect(w.scalars == (0..<(heads * d)).map(Float.init))
    }

    @Test func halfSplitRoPEOnUnpermutedRowsEqualsAdjacentRoPEOnGGUFRows() {
        // Rotating adjacent pairs of the converter's layout must equal rotating halves of transformers' layout.
        var rng = GraftRNG(seed: 3)
        let heads = 2, d = 8
        let w = Tensor.randomNormal([heads * d, 5], rng: &rng)
        let x = Tensor.randomNormal([3, 5], rng: &rng)
        let positions: [Int32] = [0, 4, 9]
        let ggufOut = rope(linear(x, w).reshaped([3, heads, d]), positions: positions, headDim: d, base: 100, style: .adjacentPairs)
        let hfOut = rope(linear(x, LlamaModel.unpermuteRoPERows(w, heads: heads)).reshaped([3, heads, d]),
                         positions: positions, headDim: d, base: 100, style: .halfSplit)
        let back = LlamaModel.unpermuteRoPERows(ggufOut.reshaped([3 * heads, d]).transposed(0, 1), heads: 1)
        let hfT = hfOut.reshaped([3 * heads, d]).transposed(0, 1)
        let err = worstOf(zip(back.scalars, hfT.scalars).map { abs($0 - $1) }, empty: 0)
        #expect(err < 1e-5)
    }

    @Test func tokenBatchRejectsBadShapesAndIds() throws {
        #expect(throws: GraftError.self) { try TokenBatch(ids: [1, 2, 3], batchSize: 2, length: 2) }
        #expect(throws: GraftError.self) { try TokenBatch(ids: [1, 2], batchSize: 1, length: 2, lengths: [3]) }
        let batch = try TokenBatch(ids: [1, 99], batchSize: 1, length: 2)
        do {
            try batch.validate(vocabularySize: 50)
            Issue.record("an out-of-vocabulary id was accepted")
        } catch let error as GraftError {
            #expect(error.code == .invalidArgument)
            #expect(error.message.contains("99") && error.message.contains("position 1"))
        }
    }

    @Test func bertConfigErrorsNameTheFileAndField() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-bert-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("config.json").path
        try Data(#"{"hidden_size": 384, "num_hidden_layers": 6}"#.utf8).write(to: URL(fileURLWithPath: path))
        do {
            _ = try BertConfig(contentsOf: path)
            Issue.record("an incomplete config was accepted")
        } catch let error as GraftError {
            #expect(error.message.contains(path) && error.message.contains("vocab_size"))
        }
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: path))
        #expect(throws: GraftError.self) { try BertConfig(contentsOf: path) }
    }
}
