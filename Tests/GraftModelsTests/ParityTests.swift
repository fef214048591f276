import Foundation
import Testing
@testable import GraftModels
import GraftIO
import GraftTensor

/// Forward passes against outputs of the real transformers models (fixtures vendored from ../shared/fixtures).
@Suite(.serialized) struct ParityTests {
    /// Reads a fixture's padded ids and attention mask as a right-padded batch.
    func batch(from file: SafeTensorsFile) throws -> TokenBatch {
        guard let info = file.info("input_ids"), info.shape.count == 2 else {
            throw GraftError.format("fixture has no 2-D input_ids")
        }
        let (b, t) = (info.shape[0], info.shape[1])
        let ids = try file.int64s("input_ids").map { Int32($0) }
        let mask = try file.int64s("attention_mask")
        var lengths: [Int] = []
        for r in 0..<b {
            let row = mask[(r * t)..<((r + 1) * t)]
            let n = row.filter { $0 == 1 }.count
            #expect(Array(row.prefix(n)).allSatisfy { $0 == 1 }, "fixture mask must be right padding")
            lengths.append(n)
        }
        return try TokenBatch(ids: ids, batchSize: b, length: t, lengths: lengths)
    }

    @Test func miniLMLastHiddenStateMatchesTransformers() throws {
        guard let dir = Assets.require(Assets.minilm) else { return }
        let model = try BertModel(directory: dir)
        let fixture = try SafeTensorsFile(contentsOf: Assets.fixture("minilm/base_expected.safetensors"))
        let expected = try fixture.tensor("last_hidden_state")
        let out = try withNoGrad { try model.forward(try batch(from: fixture)) }
        #expect(out.shape == expected.shape)
        let err = maxAbsDifference(UnsafeBufferPointer(out.buffer), UnsafeBufferPointer(expected.buffer))
        print("MiniLM last_hidden_state max-abs error vs transformers: \(err)")
        #expect(err <= 1e-4)
    }

    @Test func smolLM2LogitsMatchTransformers() throws {
        guard let path = Assets.require(Assets.smollm2) else { return }
        let model = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let fixture = try SafeTensorsFile(contentsOf: Assets.fixture("smollm2/base_expected.safetensors"))
        let expected = try fixture.tensor("logits_first2048")
        let logits = try withNoGrad { try model.logits(try batch(from: fixture)) }
        let t = expected.shape[1], cols = expected.shape[2], vocab = logits.shape[2]
        var err: Float = 0
        for i in 0..<t {
            for j in 0..<cols { err = max(err, abs(logits.pointer[i * vocab + j] - expected.pointer[i * cols + j])) }
        }
        print("SmolLM2 logits[:, :, :2048] max-abs error vs transformers: \(err)")
        #expect(err <= 1e-3)
    }

    @Test func kvCacheDecodingMatchesFullForward() throws {
        guard let path = Assets.require(Assets.smollm2) else { return }
        let model = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let ids: [Int32] = [1, 504, 3458, 282, 4649, 314, 1, 30, 9, 42]
        try withNoGrad {
            let full = try model.logits(try TokenBatch(ids: ids, batchSize: 1, length: ids.count))
            let cache = KVCache(layerCount: model.layers.count)
            _ = try model.hiddenStates(try TokenBatch(ids: Array(ids.prefix(6)), batchSize: 1, length: 6), cache: cache)
            var err: Float = 0
            for (step, id) in ids.dropFirst(6).enumerated() {
                let h = try model.hiddenStates(try TokenBatch(ids: [id], batchSize: 1, length: 1), cache: cache)
                let row = model.lmHead.forward(h.reshaped([1, model.config.hiddenSize]))
                let pos = 6 + step
                for j in 0..<model.config.vocabSize {
                    err = max(err, abs(row.pointer[j] - full.pointer[pos * model.config.vocabSize + j]))
                }
            }
            #expect(err < 1e-3, "cached decoding differs from the full forward by \(err)")
        }
    }
}
