import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor

extension GraftSession {
    /// PEFT's `merge_and_unload()` followed by transformers' `save_pretrained`, for BERT: merges adapter `name` into
    /// the base weights (it is removed from the session), then writes the plain model to `directory` as
    /// `model.safetensors` (F32, transformers' tensor names: `embeddings.…` for the bare model, `bert.…` and
    /// `classifier.…` for sequence classification) beside copies of the source directory's config and tokenizer
    /// files, crash-safely (``AtomicDirectory``). `BertModel(directory:)` and transformers load the result.
    ///
    /// Throws `.unsupported` for a Llama (GGUF) model: writing GGUF is not implemented yet.
    public func mergeAndUnloadSave(adapter name: String, directory: String) throws {
        guard model.bert != nil else {
            throw GraftError(.unsupported, "\(model.path): saving a merged \(model.architecture.rawValue) model is not supported yet (BERT directories only; GGUF writing is not implemented)")
        }
        _ = try adapted.adapter(name)
        if let trainers = adaptersInTraining[name], trainers > 0 {
            throw GraftError(.state, "adapter '\(name)' is being trained by \(trainers) trainer(s); finish them before merging it into the base")
        }
        try adapted.mergeAndUnload(name)
        var files: [(name: String, bytes: [UInt8])] = [("model.safetensors", try mergedWeights())]
        files += try sourceFiles()
        try AtomicDirectory.write(directory: directory, kind: "model", files: files)
    }

    /// The model's parameters as a safetensors file, plus the source file's tensors that are not parameters
    /// (BERT's `position_ids`) for the bare model, whose names are the source file's.
    private func mergedWeights() throws -> [UInt8] {
        var writer = SafeTensorsWriter()
        writer.metadata = ["format": "pt"]
        let parameters = adapted.root.namedParameters()
        let written = Set(parameters.map(\.name))
        for (n, t) in parameters { try writer.add(n, t) }
        if task == .base {
            let source = try SafeTensorsFile(contentsOf: model.path + "/model.safetensors")
            for n in source.names where !written.contains(n) {
                guard let info = source.info(n) else { continue }
                switch info.dtype {
                case .i64: try writer.add(n, int64s: try source.int64s(n), shape: info.shape)
                default: try writer.add(n, try source.tensor(n))
                }
            }
        }
        return writer.serialized()
    }

    /// The source directory's top-level files other than weights (config, vocabulary, tokenizer); for sequence
    /// classification, `config.json` names `BertForSequenceClassification` and its labels.
    private func sourceFiles() throws -> [(name: String, bytes: [UInt8])] {
        let fm = FileManager.default
        var out: [(name: String, bytes: [UInt8])] = []
        for file in try fm.contentsOfDirectory(atPath: model.path).sorted() {
            let path = model.path + "/" + file
            var isDirectory: ObjCBool = false
            guard fm.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue,
                  !file.hasPrefix("."), file != AtomicDirectory.manifestName,
                  ![".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot"].contains(where: { file.hasSuffix($0) }) else { continue }
            guard var bytes = fm.contents(atPath: path).map({ [UInt8]($0) }) else {
                throw GraftError(.io, "\(path): cannot read it to copy it beside the merged weights")
            }
            if file == "config.json", task == .sequenceClassification, let classifier {
                guard var config = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any] else {
                    throw GraftError.format("\(path): not a JSON object")
                }
                config["architectures"] = ["BertForSequenceClassification"]
                config["id2label"] = Dictionary(uniqueKeysWithValues: (0..<classifier.numLabels).map { ("\($0)", "LABEL_\($0)") })
                config["label2id"] = Dictionary(uniqueKeysWithValues: (0..<classifier.numLabels).map { ("LABEL_\($0)", $0) })
                bytes = [UInt8](try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys]))
            }
            out.append((file, bytes))
        }
        return out
    }
}
