import Foundation
import Testing
@testable import GraftModels
import GraftIO
import GraftTensor
import GraftTestSupport

/// Forward passes against outputs of the real transformers models (fixtures vendored from ../shared/fixtures).
@Suite(.serialized) struct ParityTests {
    @Test func miniLMLastHiddenStateMatchesTransformers() throws {
        let model = try Assets.loadMiniLM()
        let fixture = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
        let expected = try fixture.tensor("last_hidden_state")
        let out = try withNoGrad { try model.forward(try fixtureBatch(fixture)) }
        #expect(out.shape == expected.shape)
        let err = maxAbsDifference(out, expected)
        print("MiniLM last_hidden_state max-abs error vs transformers: \(err)")
        #expect(err <= 1e-4)
    }

    @Test func smolLM2LogitsMatchTransformers() throws {
        let path = try Assets.require(Assets.smollm2)
        let model = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let fixture = try SafeTensorsFile(contentsOf: Assets.fixture("smollm2/base_expected.safetensors"))
        let expected = try fixture.tensor("logits_first2048")
        let logits = try withNoGrad { try model.logits(try fixtureBatch(fixture)) }
        let t = expected.shape[1], cols = expected.shape[2], vocab = logits.shape[2]
        var err: Float = 0
        for i in 0..<t {
            for j in 0..<cols { err = worse(err, abs(logits.pointer[i * vocab + j] - expected.pointer[i * cols + j])) }
        }
        print("SmolLM2 logits[:, :, :2048] max-abs error vs transformers: \(err)")
        #expect(err <= 1e-3)
    }

    @Test func kvCacheDecodingMatchesFullForward() throws {
        let path = try Assets.require(Assets.smollm2)
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
                    err = worse(err, abs(row.pointer[j] - full.pointer[pos * model.config.vocabSize + j]))
                }
            }
            #expect(err < 1e-3, "cached decoding differs from the full forward by \(err)")
        }
    }
}
