import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

extension FuzzHarness {
    /// A two-layer BERT with hidden size 8 (vocab 32, 2 heads, intermediate 16, 16 positions), written once
    /// as a config.json in a temporary directory; its weights are small deterministic values.
    static let toyBertConfig: BertConfig = {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-fuzz-\(getpid())")
        let path = dir.appendingPathComponent("config.json").path
        let json = #"{"vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu"}"#
        do {
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try json.write(toFile: path, atomically: true, encoding: .utf8)
            let config = try BertConfig(contentsOf: path)
            try? FileManager.default.removeItem(at: dir)
            return config
        } catch {
            fatalError("adapter-config: cannot write the toy model config: \(error)")
        }
    }()

    /// A fresh toy classifier (adapters attach to its modules, so every input gets its own).
    static func toyClassifier() throws -> BertForSequenceClassification {
        let c = toyBertConfig
        let h = c.hiddenSize
        func shape(_ name: String) -> [Int] {
            if name.hasSuffix("word_embeddings.weight") { return [c.vocabSize, h] }
            if name.hasSuffix("position_embeddings.weight") { return [c.maxPositions, h] }
            if name.hasSuffix("token_type_embeddings.weight") { return [c.typeVocabSize, h] }
            if name.hasSuffix("intermediate.dense.weight") { return [c.intermediateSize, h] }
            if name.hasSuffix("intermediate.dense.bias") { return [c.intermediateSize] }
            if name.hasSuffix("output.dense.weight") && !name.contains("attention") { return [h, c.intermediateSize] }
            if name.hasSuffix(".weight") && !name.contains("LayerNorm") { return [h, h] }
            return [h]
        }
        let bert = try BertModel(config: c, weights: { name in
            let s = shape(name)
            let n = s.reduce(1, *)
            let seed = name.utf8.reduce(7) { ($0 &* 31 &+ Int($1)) & 0xffff }
            let isNormWeight = name.contains("LayerNorm.weight")
            return Tensor(shape: s, values: (0..<n).map { i in
                isNormWeight ? 1 : Float(((i &* 37 &+ seed) % 17) - 8) / 40
            })
        }, hasPooler: true)
        return try BertForSequenceClassification(bert: bert, numLabels: 3)
    }

    /// Parses the input as `adapter_config.json` text, adds the adapter to a toy BERT classifier (which runs
    /// the method's own key validation and builds its tensors), then runs one forward pass, merges and
    /// unmerges when the method allows it, and deletes it, as loading or creating an adapter and using it does.
    public static func adapterConfig(_ data: UnsafeRawBufferPointer) {
        let text = String(decoding: data, as: UTF8.self)
        expectGraftError("adapter-config") {
            let config = try AdapterConfig(jsonText: text, source: "fuzz adapter_config.json")
            let classifier = try toyClassifier()
            let model = AdaptedModel(root: classifier)
            _ = try model.addAdapter("fuzz", config: config, seed: 1)
            // An attached adapter and its base layer reference each other; deleting it is what frees the model.
            defer { expectGraftError("adapter-config delete") { try model.deleteAdapter("fuzz") } }
            let batch = try TokenBatch(sequences: [[1, 5, 9, 2], [1, 30, 2]])
            try withNoGrad {
                _ = try classifier.forward(batch)
                expectGraftError("adapter-config merge") {
                    try model.merge("fuzz")
                    _ = try classifier.forward(batch)
                    try model.unmerge("fuzz")
                }
            }
        }
    }
}
