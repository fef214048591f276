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

    @Test func badOptionsNameTheKeyAndLlamaIsUnsupported() throws {
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
        let llama = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        try llama.addAdapter(name: "l", configJSON: #"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}"#)
        #expect(throws: GraftError.self) { try llama.mergeAndUnloadSave(adapter: "l", directory: "/nonexistent/never-written") }
        #expect(llama.adapted.adapters.map(\.name) == ["l"], "a refused export leaves the adapter attached")
    }
}
