import Foundation
import Testing
import Graft
import GraftTestSupport

/// llama.cpp's GGUF LoRA format: the export writes what convert_lora_to_gguf.py writes, and a GGUF LoRA file loads
/// back into Graft as the same adapter (float32 exactly; lossy types within their rounding bounds).
@Suite(.serialized) struct GGUFLoRATests {
    static let targets = #"["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]"#

    static func session() throws -> GraftSession {
        try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
    }

    static func temporary(_ suffix: String) -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("graft-gguf-lora-\(UUID().uuidString)\(suffix)").path
    }

    static func logits(_ s: GraftSession) throws -> Tensor {
        let ids = s.model.encode("Tweet: I love my new self-driving car\nSentiment:")
        return try withNoGrad { try s.model.forward(try TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
    }

    static func lora(_ s: GraftSession, _ name: String) throws -> [String: LoRALayer] {
        var out: [String: LoRALayer] = [:]
        for (p, _, m) in try s.adapted.adapter(name).layers { if let l = m as? LoRALayer { out[p] = l } }
        return out
    }

    /// The converter's layout: metadata keys and values, one lora_a/lora_b pair per adapted weight named after the
    /// base tensor, lora_a = A `{in, r}`, lora_b = B `{r, out}` with q (9 heads) and k (3 KV heads) rows permuted
    /// into GGUF's RoPE order and v left alone.
    @Test func exportWritesTheConvertersLayout() throws {
        let s = try Self.session()
        try s.addAdapter(name: "l", configJSON: #"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": \#(Self.targets), "init_lora_weights": false}"#, seed: 1)
        let path = Self.temporary(".gguf")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let report = try s.exportGGUFLoRA(adapter: "l", to: path)
        #expect(report.pairs == 210 && report.tensorTypes == ["F32": 420] && report.rescaled.isEmpty)
        let f = try GGUFFile(contentsOf: path)
        #expect(f.metadataKeys == ["general.architecture", "general.type", "adapter.type", "general.name", "adapter.lora.alpha", "general.quantization_version"])
        #expect(f.string("general.architecture") == "llama" && f.string("general.type") == "adapter" && f.string("adapter.type") == "lora")
        #expect(f.metadata["adapter.lora.alpha"] == .float32(16) && f.metadata["general.quantization_version"] == .uint32(2))
        #expect(f.tensors.count == 420 && f.tensors.allSatisfy { $0.type == .f32 })
        let layers = try Self.lora(s, "l")
        guard case .decoder(let llama) = s.model.backbone else { throw GraftError.format("not Llama") }
        for (module, gguf, heads) in [("self_attn.q_proj", "attn_q", llama.config.heads), ("self_attn.k_proj", "attn_k", llama.config.kvHeads),
                                      ("self_attn.v_proj", "attn_v", 0), ("mlp.down_proj", "ffn_down", 0)] {
            for layer in [0, 29] {
                guard let l = layers["model.layers.\(layer).\(module)"] else { Issue.record("no \(module)"); continue }
                let a = try f.tensor("blk.\(layer).\(gguf).weight.lora_a"), b = try f.tensor("blk.\(layer).\(gguf).weight.lora_b")
                #expect(a.shape == l.loraA.shape && b.shape == l.loraB.shape)
                #expect(maxAbsDifference(a, l.loraA) == 0)
                let expectedB = heads > 0 ? LlamaModel.permuteRoPERows(l.loraB, heads: heads) : l.loraB
                #expect(maxAbsDifference(b, expectedB) == 0, "\(module) lora_b")
                if heads > 0 { #expect(maxAbsDifference(b, l.loraB) > 0, "\(module) lora_b must be permuted") }
            }
        }
    }

    /// PEFT directory → GGUF (F32) → Graft: the loaded adapter's logits equal the directory's within 1e-5, with a
    /// rank_pattern (mixed ranks: r and rank_pattern rebuilt on load); with rsLoRA (α/√r, whose ratio to llama.cpp's
    /// α/r is folded into lora_b: one float32 rounding per element, relative 2⁻²⁴) within 1e-5 of the largest logit. B is scaled to 0.05 of PEFT's
    /// random init, the size of a trained adapter's update (a few logits).
    @Test(arguments: [false, true])
    func float32RoundTripReproducesThePEFTDirectory(rsLoRA: Bool) throws {
        let s = try Self.session()
        let base = try Self.logits(s)
        try s.addAdapter(name: "src", configJSON: #"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": \#(rsLoRA), "rank_pattern": {"v_proj": 4}, "target_modules": \#(Self.targets), "init_lora_weights": false}"#, seed: 2)
        for (_, l) in try Self.lora(s, "src") { for i in 0..<l.loraB.count { l.loraB.pointer[i] *= 0.05 } }
        let dir = Self.temporary(""), path = Self.temporary(".gguf")
        defer { try? FileManager.default.removeItem(atPath: dir); try? FileManager.default.removeItem(atPath: path) }
        try s.saveAdapter("src", directory: dir)
        try s.deleteAdapter(name: "src")
        try s.loadAdapter(directory: dir, name: "peft")
        let peft = try Self.logits(s)
        let report = try s.exportGGUFLoRA(adapter: "peft", to: path)
        #expect(report.rescaled.count == (rsLoRA ? 210 : 0), "only rsLoRA's α/√r differs from llama.cpp's α/r")
        try s.loadAdapter(directory: path, name: "gguf")
        #expect(s.adapted.activeAdapter == "gguf")
        let loaded = try Self.lora(s, "gguf"), original = try Self.lora(s, "peft")
        #expect(loaded["model.layers.3.self_attn.v_proj"]?.rank == 4 && loaded["model.layers.3.self_attn.q_proj"]?.rank == 8)
        let roundTrip = try Self.logits(s)
        let err = maxAbsDifference(roundTrip, peft), effect = maxAbsDifference(peft, base)
        print("GGUF LoRA F32 round trip\(rsLoRA ? " (rsLoRA)" : ""): logits max-abs vs the PEFT directory \(err) (the adapter moves logits by up to \(effect))")
        // Plain LoRA: the same factors and scale, so the same float32 arithmetic (1e-5; it is 0). rsLoRA: lora_b is
        // B·√r rounded once per element, and the forward rounds B'·(α/r) instead of B·(α/√r), float32-level changes
        // that 30 layers carry to the logits: 1e-5 relative to the largest logit.
        let scale = worstOf((0..<peft.count).map { abs(peft.pointer[$0]) }, empty: .nan)
        #expect(err <= (rsLoRA ? 1e-5 * scale : 1e-5), "largest |logit| \(scale)")
        #expect(effect > 0.5, "the adapter must change the logits for the comparison to mean anything")
        for (p, l) in original {
            guard let g = loaded[p] else { Issue.record("'\(p)' not loaded"); continue }
            #expect(maxAbsDifference(g.loraA, l.loraA) == 0, "\(p) lora_A")
            #expect(g.scaling == 16 / Float(g.rank), "\(p): llama.cpp's α/r")
            let ratio = l.scaling / g.scaling
            var excess: Float = 0
            for i in 0..<l.loraB.count {
                let want = l.loraB.pointer[i] * ratio
                excess = worse(excess, abs(g.loraB.pointer[i] - want) - abs(want) * 0x1p-24)
            }
            #expect(excess <= 0, "\(p) lora_B: B·(s/s_llama) rounded once")
        }
    }

    /// F16, BF16 and Q8_0 factors load back within their rounding bound, element by element (Q8_0: half a step
    /// d = max|block|/127 plus d's own f16 rounding over up to 127 steps; lora_b, rows of r = 8, falls back to F16).
    @Test func lossyTypesStayWithinTheirRoundingBounds() throws {
        let s = try Self.session()
        try s.addAdapter(name: "src", configJSON: #"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": \#(Self.targets), "init_lora_weights": false}"#, seed: 3)
        let exact = try Self.logits(s)
        let original = try Self.lora(s, "src")
        for type in [GGUFLoRA.TensorType.f16, .bf16, .q8_0] {
            let path = Self.temporary(".gguf")
            defer { try? FileManager.default.removeItem(atPath: path) }
            let report = try s.exportGGUFLoRA(adapter: "src", to: path, type: type)
            let expectedTypes: [String: Int] = type == .q8_0 ? ["Q8_0": 210, "F16": 210] : [type == .f16 ? "F16" : "BF16": 420]
            #expect(report.tensorTypes == expectedTypes, "\(type)")
            try s.loadAdapter(directory: path, name: type.rawValue)
            let loaded = try Self.lora(s, type.rawValue)
            var excess: Float = 0
            for (p, l) in original {
                guard let g = loaded[p] else { Issue.record("'\(p)' not loaded"); continue }
                for (x, y, isA) in [(l.loraA, g.loraA, true), (l.loraB, g.loraB, false)] {
                    let cols = x.shape[1]
                    for i in 0..<x.count {
                        let v = x.pointer[i], bound: Float
                        switch (type, isA) {
                        case (.bf16, _): bound = abs(v) * 0x1p-8
                        case (.q8_0, true):
                            let start = i / 32 * 32, row = i / cols
                            guard start + 32 <= (row + 1) * cols else { bound = 0; break }
                            var m: Float = 0
                            for j in start..<(start + 32) { m = worse(m, abs(x.pointer[j])) }
                            let d = m / 127
                            bound = d / 2 + 127 * d * 0x1p-11
                        default: bound = abs(v) * 0x1p-11 + 0x1p-25
                        }
                        excess = worse(excess, abs(y.pointer[i] - v) - bound)
                    }
                }
            }
            #expect(excess <= 0, "\(type): an element lies \(excess) beyond its rounding bound")
            let err = maxAbsDifference(try Self.logits(s), exact)
            print("GGUF LoRA \(type.rawValue) (\(report.bytes) bytes): logits max-abs vs the float32 adapter \(err)")
            #expect(err.isFinite)
            try s.deleteAdapter(name: type.rawValue)
            try s.adapted.setActiveAdapter("src")
        }
    }

    /// Adapters llama.cpp cannot hold are refused by name, and malformed files name the file and the tensor or key
    /// at fault, leaving no half-loaded adapter behind.
    @Test func refusalsAndMalformedFilesNameTheFault() throws {
        let s = try Self.session()
        let path = Self.temporary(".gguf")
        defer { try? FileManager.default.removeItem(atPath: path) }
        for (config, mentions) in [(#"{"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#, "IA3"),
                                   (#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "use_dora": true}"#, "DoRA")] {
            try s.addAdapter(name: "x", configJSON: config)
            #expect(throws: GraftError.self) { try s.exportGGUFLoRA(adapter: "x", to: path) }
            do { try s.exportGGUFLoRA(adapter: "x", to: path) } catch let e as GraftError { #expect(e.message.contains(mentions), "\(e.message)") }
            try s.deleteAdapter(name: "x")
        }
        #expect(!FileManager.default.fileExists(atPath: path))

        func file(_ build: (inout GGUFWriter) throws -> Void) throws {
            var w = GGUFWriter()
            try build(&w)
            try AtomicFile.write(w.serialized(), to: path)
        }
        func header(_ w: inout GGUFWriter, type: String = "adapter", arch: String = "llama") throws {
            try w.add("general.architecture", .string(arch))
            try w.add("general.type", .string(type))
            try w.add("adapter.type", .string("lora"))
            try w.add("adapter.lora.alpha", .float32(8))
        }
        let a = Tensor(zeros: [4, 576]), b = Tensor(zeros: [576, 4])
        let cases: [(String, (inout GGUFWriter) throws -> Void)] = [
            ("general.type is 'model'", { w in try header(&w, type: "model") }),
            ("general.architecture is 'gpt2'", { w in try header(&w, arch: "gpt2") }),
            ("lacks its lora_b", { w in try header(&w); try w.addTensor("blk.0.attn_q.weight.lora_a", a, type: .f32) }),
            ("'blk.0.attn_q.weight.bias' is neither", { w in try header(&w); try w.addTensor("blk.0.attn_q.weight.bias", a, type: .f32) }),
            ("'blk.99.attn_q.weight' does not exist", { w in
                try header(&w); try w.addTensor("blk.99.attn_q.weight.lora_a", a, type: .f32); try w.addTensor("blk.99.attn_q.weight.lora_b", b, type: .f32) }),
            ("'blk.0.ffn_down.weight' has lora_a [4, 576]", { w in
                try header(&w); try w.addTensor("blk.0.ffn_down.weight.lora_a", a, type: .f32); try w.addTensor("blk.0.ffn_down.weight.lora_b", b, type: .f32) }),
            ("element 0 is", { w in
                try header(&w)
                try w.addTensor("blk.0.attn_v.weight.lora_a", shape: [4, 576], type: .f32, bytes: [UInt8](repeating: 0xFF, count: 4 * 576 * 4))
                try w.addTensor("blk.0.attn_v.weight.lora_b", Tensor(zeros: [192, 4]), type: .f32) }),
        ]
        for (mentions, build) in cases {
            try file(build)
            do {
                try s.loadAdapter(directory: path, name: "bad")
                Issue.record("loaded a file that should fail with '\(mentions)'")
            } catch let e as GraftError {
                #expect(e.message.contains(mentions) && e.message.contains(path), "\(e.message)")
            }
            #expect(s.adapted.adapters.isEmpty, "a failed load leaves no adapter")
        }
        let bert = try GraftSession(path: try Assets.require(Assets.minilm), task: .base)
        #expect(throws: GraftError.self) { try bert.loadGGUFLoRA(path: path) }
    }
}
