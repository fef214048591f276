import Foundation
import Testing
import Graft
import GraftTestSupport

/// The session-level door of PEFT's add_weighted_adapter (JSON options, JSON report) and merge_and_unload +
/// save_pretrained: the saved BERT directory, loaded as a plain model, gives PEFT's combined adapter's output.
@Suite(.serialized) struct MergedModelExportTests {
    static func fixture(_ relative: String) -> String { Assets.fixture("peft-minilm-merge/" + relative) }

    @Test func combinedThenMergedModelReproducesPEFTsCombination() throws {
        let session = try GraftSession(path: try Assets.require(Assets.minilm), task: .base)
        try session.adapted.loadAdapter(directory: Self.fixture("a"), name: "a")
        try session.adapted.loadAdapter(directory: Self.fixture("b4"), name: "b4")
        let report = try session.combineAdapters(name: "ties", adapters: ["a", "b4"], weights: [0.7, 0.5],
                                                 optionsJSON: #"{"combination_type": "ties", "density": 0.5, "svd_driver": null}"#)
        let parsed = try JSONSerialization.jsonObject(with: Data(report.utf8)) as? [String: Any]
        #expect(parsed?["r"] as? Int == 4 && parsed?["combination_type"] as? String == "ties" && parsed?["kept_fraction"] is NSNull)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-merged-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try session.mergeAndUnloadSave(adapter: "ties", directory: dir)
        #expect(session.adapted.adapters.map(\.name) == ["a", "b4"], "the merged adapter is unloaded, the others stay")

        let merged = try BertModel(directory: dir)
        let inputs = try SafeTensorsFile(contentsOf: Self.fixture("inputs.safetensors"))
        let out = try withNoGrad { try merged.forward(try fixtureBatch(inputs)) }
        let expected = try SafeTensorsFile(contentsOf: Self.fixture("ties/expected.safetensors")).tensor("last_hidden_state")
        let err = maxAbsDifference(out, expected)
        print("merge_and_unload of PEFT's ties combination, saved and reloaded: max-abs vs PEFT \(err)")
        #expect(err <= 1e-4)
        // transformers' names, the source's non-parameter tensors, and its config and tokenizer files.
        let source = try SafeTensorsFile(contentsOf: Assets.minilm + "/model.safetensors")
        let saved = try SafeTensorsFile(contentsOf: dir + "/model.safetensors")
        #expect(Set(saved.names) == Set(source.names))
        for file in ["config.json", "vocab.txt", "tokenizer.json"] {
            #expect(FileManager.default.contentsEqual(atPath: dir + "/" + file, andPath: Assets.minilm + "/" + file), "\(file)")
        }
    }

    @Test func badOptionsNameTheKey() throws {
        let session = try GraftSession(path: try Assets.require(Assets.minilm), task: .base)
        try session.adapted.loadAdapter(directory: Self.fixture("a"), name: "a")
        try session.adapted.loadAdapter(directory: Self.fixture("b4"), name: "b4")
        for (options, mentions) in [(#"{"densty": 0.5}"#, "densty"), (#"{"density": "half"}"#, "'density' must be a number"),
                                    (#"{"svd_rank": 2.5}"#, "'svd_rank' must be an integer"), ("[1]", "must be a JSON object"),
                                    (#"{"seed": -1}"#, "'seed' must be ≥ 0"), (#"{"svd_full_matrices": 1}"#, "true or false")] {
            do {
                _ = try session.combineAdapters(name: "x", adapters: ["a", "b4"], weights: [1, 1], optionsJSON: options)
                Issue.record("accepted \(options)")
            } catch let e as GraftError {
                #expect(e.message.contains(mentions), "\(e.message)")
            }
        }
        #expect(throws: GraftError.self) { try session.mergeAndUnloadSave(adapter: "missing", directory: "/nonexistent/never") }
    }

    /// A merged SmolLM2 (Q4_1 GGUF) is written as the same GGUF with the merged tensors re-encoded in their types:
    /// untouched tensors byte for byte, merged ones within half a quantization step (plus f16 rounding) of the
    /// float32 merge, and the reloaded model predicts what the merged one does.
    @Test func mergedLlamaIsWrittenAsGGUFInTheSourceTypes() throws {
        let session = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        try session.addAdapter(name: "l", configJSON: #"{"peft_type": "LORA", "r": 4, "lora_alpha": 0.4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": false}"#, seed: 3)
        let ids = session.model.encode("The capital of France is")
        let batch = try TokenBatch(ids: ids, batchSize: 1, length: ids.count)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-merged-gguf-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try session.mergeAndUnloadSave(adapter: "l", directory: dir)
        let merged = try withNoGrad { try session.model.forward(batch) }
        // ΔW here is a few percent of W (scaling 0.1), the size a trained adapter's update has.

        let path = dir + "/" + URL(fileURLWithPath: Assets.smollm2).lastPathComponent
        let source = try GGUFFile(contentsOf: Assets.smollm2), written = try GGUFFile(contentsOf: path)
        #expect(written.tensors == source.tensors && written.metadataKeys == source.metadataKeys)
        var changed: [String] = []
        for info in source.tensors {
            let same = try source.withRawBytes(info) { a in try written.withRawBytes(info) { b in a.elementsEqual(b) } }
            if !same { changed.append(info.name) }
        }
        #expect(Set(changed) == Set((0..<30).flatMap { ["blk.\($0).attn_q.weight", "blk.\($0).attn_v.weight"] }))

        let reloaded = try GraftModel(path: path)
        guard case .decoder(let a) = session.model.backbone, case .decoder(let b) = reloaded.backbone else {
            throw GraftError.format("not Llama")
        }
        var worstExcess: Float = 0
        for (la, lb) in zip(a.layers, b.layers) {
            for (wa, wb) in [(la.qProj.weight, lb.qProj.weight), (la.vProj.weight, lb.vProj.weight)] {
                // Q4_1 blocks are 32 consecutive entries of a row (rows are whole blocks here, q/k rows permuted whole).
                for block in 0..<(wa.count / 32) {
                    let x = UnsafeBufferPointer(start: wa.pointer + block * 32, count: 32)
                    guard let lo = x.min(), let hi = x.max() else { continue }
                    let step = (hi - lo) / 15, bound = step / 2 + 16 * step * 0x1p-11 + abs(lo) * 0x1p-11 + 1e-7
                    for j in 0..<32 { worstExcess = worse(worstExcess, abs(wa.pointer[block * 32 + j] - wb.pointer[block * 32 + j]) - bound) }
                }
            }
        }
        #expect(worstExcess <= 0, "an entry lies \(worstExcess) beyond half a Q4_1 step")
        let out = try withNoGrad { try reloaded.forward(batch) }
        let vocab = out.shape[2], last = (ids.count - 1) * vocab
        func argmax(_ t: Tensor) -> Int { (0..<vocab).max { t.pointer[last + $0] < t.pointer[last + $1] } ?? -1 }
        let range = worstOf((0..<merged.count).map { abs(merged.pointer[$0]) }, empty: .nan)
        print("merged SmolLM2 written as Q4_1 GGUF: \(changed.count) tensors re-encoded, logits max-abs vs the float32 merge \(maxAbsDifference(out, merged)) (logits up to \(range))")
        #expect(argmax(out) == argmax(merged))
    }
}
