import Foundation
import Testing
@testable import GraftModels
import GraftIO
import GraftTensor
import GraftTestSupport

/// bfloat16 mode against the float32 fixtures of the real transformers models (issue 12, item 4): a report of
/// how far it moves the outputs, with a sanity bound that a broken kernel (wrong layout, wrong transpose) breaks
/// by orders of magnitude. float32 stays the mode the parity tests check to 1e-4.
@Suite(.serialized) struct BFloat16ParityTests {
    @Test func miniLMInBFloat16StaysNearTransformers() throws {
        guard ComputeDType.bfloat16.resolved == .bfloat16 else { return }
        let model = try Assets.loadMiniLM()
        #expect(model.setComputeDType(.bfloat16) == .bfloat16)
        let fixture = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
        let expected = try fixture.tensor("last_hidden_state")
        let out = try withNoGrad { try model.forward(try fixtureBatch(fixture)) }
        let err = maxAbsDifference(out, expected)
        let scale = worstOf(expected.scalars.map(abs), empty: .nan)
        print("MiniLM bfloat16 last_hidden_state max-abs error vs transformers float32: \(err) (outputs up to \(scale))")
        #expect(err <= 0.02 * scale)
        model.setComputeDType(.float32)
        let exact = try withNoGrad { try model.forward(try fixtureBatch(fixture)) }
        #expect(maxAbsDifference(exact, expected) <= 1e-4, "back in float32 the outputs are exact again")
    }

    @Test func smolLM2InBFloat16StaysNearTransformers() throws {
        guard ComputeDType.bfloat16.resolved == .bfloat16 else { return }
        let model = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        model.setComputeDType(.bfloat16)
        let fixture = try SafeTensorsFile(contentsOf: Assets.fixture("smollm2/base_expected.safetensors"))
        let expected = try fixture.tensor("logits_first2048")
        let logits = try withNoGrad { try model.logits(try fixtureBatch(fixture)) }
        let t = expected.shape[1], cols = expected.shape[2], vocab = logits.shape[2]
        var err: Float = 0, scale: Float = 0
        var agree = 0
        for i in 0..<t {
            var best = 0, bestExpected = 0
            for j in 0..<cols {
                err = worse(err, abs(logits.pointer[i * vocab + j] - expected.pointer[i * cols + j]))
                scale = worse(scale, abs(expected.pointer[i * cols + j]))
                if logits.pointer[i * vocab + j] > logits.pointer[i * vocab + best] { best = j }
                if expected.pointer[i * cols + j] > expected.pointer[i * cols + bestExpected] { bestExpected = j }
            }
            if best == bestExpected { agree += 1 }
        }
        print("SmolLM2 bfloat16 logits[:, :, :2048] max-abs error vs transformers float32: \(err) (logits up to \(scale)); argmax agrees at \(agree) of \(t) positions")
        #expect(err <= 0.05 * scale)
    }
}
