import Foundation
import Testing
import GraftTensor
@testable import GraftIO

/// Reads the real SmolLM2-135M-Instruct Q4_1 GGUF fetched by scripts/fetch-assets.
@Suite struct RealModelTests {
    static var modelPath: String {
        let env = ProcessInfo.processInfo.environment
        let home = env["GRAFT_HOME"] ?? ((env["HOME"] ?? NSHomeDirectory()) + "/.cache/graft")
        return home + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    }

    static func open() throws -> GGUFFile? {
        guard FileManager.default.fileExists(atPath: modelPath) else {
            Issue.record("\(modelPath) is missing: run scripts/fetch-assets to download the test assets")
            return nil
        }
        return try GGUFFile(contentsOf: modelPath)
    }

    static func stats(_ t: Tensor) -> (allFinite: Bool, mean: Double, std: Double) {
        var s = 0.0, s2 = 0.0, finite = true
        for v in t.buffer {
            if !v.isFinite { finite = false }
            s += Double(v); s2 += Double(v) * Double(v)
        }
        let n = Double(t.count)
        return (finite, s / n, (s2 / n - (s / n) * (s / n)).squareRoot())
    }

    static func expectClose(_ a: [Float], _ b: [Float], sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(a.count == b.count, sourceLocation: sourceLocation)
        for (x, y) in zip(a, b) where abs(x - y) > 1e-6 * max(1, abs(y)) {
            Issue.record("\(a) != \(b)", sourceLocation: sourceLocation)
            return
        }
    }

    @Test func headerAndMetadata() throws {
        guard let f = try Self.open() else { return }
        #expect(f.version == 3)
        #expect(f.string("general.architecture") == "llama")
        #expect(f.int("llama.block_count") == 30)
        #expect(f.int("llama.embedding_length") == 576)
        #expect(f.int("llama.attention.head_count") == 9)
        #expect(f.float("llama.rope.freq_base") == 100_000)
        #expect(f.metadata["tokenizer.ggml.tokens"]?.stringArray?.count == 49152)
        #expect(f.metadata["tokenizer.ggml.merges"]?.stringArray?.count == 48900)
        #expect(f.tensors.count == 272)
        #expect(f.tensorInfo("token_embd.weight")?.type == .q8_0)
        #expect(f.tensorInfo("token_embd.weight")?.shape == [49152, 576])
        #expect(f.tensorInfo("blk.0.attn_q.weight")?.type == .q4_1)
        #expect(f.tensorInfo("blk.0.attn_q.weight")?.shape == [576, 576])
        #expect(f.tensorInfo("blk.0.attn_k.weight")?.shape == [192, 576])
        #expect(f.tensorInfo("blk.0.attn_norm.weight")?.type == .f32)
        // Offsets as gguf-py's GGUFReader reports them.
        #expect(f.tensorInfo("token_embd.weight")?.offset == 1_785_664)
        #expect(f.tensorInfo("blk.0.attn_q.weight")?.offset == 33_806_656)
    }

    @Test func dequantizedValuesMatchGGUFPy() throws {
        guard let f = try Self.open() else { return }
        // Expected values below came from gguf-py 0.19.0: gguf.quants.dequantize(tensor.data, tensor.tensor_type).
        let q = try f.tensor("blk.0.attn_q.weight")
        #expect(q.shape == [576, 576])
        Self.expectClose(Array(q.buffer.prefix(8)),
                         [-0.0963134765625, 0.1573486328125, -0.0963134765625, -0.73046875, 1.1719970703125, -0.0963134765625, 0.030517578125, 0.6646728515625])
        Self.expectClose(Array(q.buffer.suffix(8)),
                         [-0.0438232421875, 0.009185791015625, 0.009185791015625, 0.539276123046875, 0.009185791015625, -0.096832275390625, -0.14984130859375, -0.255859375])
        let qs = Self.stats(q)
        #expect(qs.allFinite && abs(qs.std - 0.28394606853848364) < 1e-4)

        let k = try f.tensor("blk.0.attn_k.weight")
        #expect(k.shape == [192, 576])
        Self.expectClose(Array(k.buffer.prefix(8)),
                         [-0.1552734375, 0.3402099609375, -0.485595703125, -0.3204345703125, 0.0098876953125, 0.175048828125, 0.175048828125, 0.50537109375])

        let e = try f.tensor("token_embd.weight")
        #expect(e.shape == [49152, 576])
        Self.expectClose(Array(e.buffer.prefix(8)),
                         [-0.10654449462890625, 0.032978057861328125, 0.048198699951171875, -0.022830963134765625, -0.06849288940429688, -0.04566192626953125, 0.020294189453125, -0.12176513671875])
        Self.expectClose(Array(e.buffer.suffix(8)),
                         [0.027801513671875, 0.03475189208984375, 0.18592262268066406, -0.10078048706054688, 0.07819175720214844, 0.12858200073242188, -0.11989402770996094, -0.0417022705078125])
        let es = Self.stats(e)
        #expect(es.allFinite && abs(es.std - 0.13557820779584165) < 1e-4 && abs(es.mean) < 0.01)

        let norm = try f.tensor("output_norm.weight")
        Self.expectClose(Array(norm.buffer.prefix(4)), [1.7578125, 1.8203125, 1.78125, 1.6015625])
    }
}
