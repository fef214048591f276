import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor

extension GraftSession {
    /// PEFT's `merge_and_unload()` followed by saving the plain model: merges adapter `name` into the base weights
    /// (it is removed from the session), then writes the model to `directory`, crash-safely (``AtomicDirectory``).
    ///
    /// BERT: `model.safetensors` (F32, transformers' tensor names: `embeddings.…` for the bare model, `bert.…` and
    /// `classifier.…` for sequence classification) beside copies of the source directory's config and tokenizer
    /// files, as transformers' `save_pretrained` writes it; `BertModel(directory:)` and transformers load it.
    /// Llama: a copy of the source GGUF file (same name, metadata, tensor order and types) whose merged tensors are
    /// re-encoded in their own type (F32, F16, BF16, Q8_0 or Q4_1, as ggml quantizes), so llama.cpp and Graft load it.
    ///
    /// Throws before merging anything when the adapter cannot be written (a GGUF tensor type Graft cannot encode, a
    /// module adapter such as LN tuning on a GGUF model), so the adapter is then still attached.
    public func mergeAndUnloadSave(adapter name: String, directory: String) throws {
        let a = try adapted.adapter(name)
        if let trainers = adaptersInTraining[name], trainers > 0 {
            throw GraftError(.state, "adapter '\(name)' is being trained by \(trainers) trainer(s); finish them before merging it into the base")
        }
        if case .decoder = model.backbone {
            let gguf = try GGUFFile(contentsOf: model.path)
            let targets = try ggufTargets(of: a, in: gguf)
            try adapted.mergeAndUnload(name)
            let file = URL(fileURLWithPath: model.path).lastPathComponent
            try AtomicDirectory.write(directory: directory, kind: "model", files: [(file, try mergedGGUF(gguf, targets))])
            return
        }
        try adapted.mergeAndUnload(name)
        var files: [(name: String, bytes: [UInt8])] = [("model.safetensors", try mergedWeights())]
        files += try sourceFiles()
        try AtomicDirectory.write(directory: directory, kind: "model", files: files)
    }

    /// The GGUF tensors a merge of `adapter` changes, each with the Linear that will hold its new value.
    private func ggufTargets(of adapter: NamedAdapter, in gguf: GGUFFile) throws -> [(info: GGUFTensorInfo, linear: Linear, path: String)] {
        if let (path, _) = adapter.modules.first {
            throw GraftError(.unsupported, "adapter '\(adapter.name)' changes module '\(path)' (\(adapter.config.peftType)); only Linear deltas are written into GGUF files so far")
        }
        var byHF: [String: GGUFTensorInfo] = [:]
        for info in gguf.tensors {
            if let hf = LlamaModel.huggingFaceName(forGGUF: info.name) { byHF[hf] = info }
        }
        var out: [(info: GGUFTensorInfo, linear: Linear, path: String)] = []
        let linears = adapter.layers.map { ($0.path, $0.linear) } + adapter.savedModules.map { ($0.path, $0.linear) }
        for (path, linear) in linears {
            // A tied lm_head is stored as token_embd.
            guard let info = byHF[path + ".weight"] ?? (path == "lm_head" ? byHF["model.embed_tokens.weight"] : nil) else {
                throw GraftError(.notFound, "\(gguf.path): no tensor holds '\(path).weight'")
            }
            guard info.type.canQuantize else {
                throw GraftError(.unsupported, "\(gguf.path): '\(info.name)' is \(info.type.name); Graft writes F32, F16, BF16, Q8_0 and Q4_1 tensors, so adapter '\(adapter.name)' cannot be merged into this file")
            }
            guard info.elementCount == linear.weight.count else {
                throw GraftError.format("\(gguf.path): '\(info.name)' has \(info.elementCount) elements, '\(path)' \(linear.weight.count)")
            }
            out.append((info, linear, path))
        }
        return out
    }

    /// The source GGUF bytes with each target tensor re-encoded from its Linear's (merged) weight, its Q/K rows put
    /// back in the converter's RoPE order.
    private func mergedGGUF(_ gguf: GGUFFile, _ targets: [(info: GGUFTensorInfo, linear: Linear, path: String)]) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: gguf.path) else {
            throw GraftError(.io, "\(gguf.path): cannot read it to write the merged copy")
        }
        var bytes = [UInt8](data)
        guard case .decoder(let llama) = model.backbone else { return bytes }
        let config = llama.config
        for (info, linear, path) in targets {
            guard info.offset >= 0, info.offset + info.byteCount <= bytes.count else {
                throw GraftError.format("\(gguf.path): tensor '\(info.name)' lies outside the file")
            }
            var w = linear.weight
            if path.hasSuffix("q_proj") { w = LlamaModel.permuteRoPERows(w, heads: config.heads) }
            if path.hasSuffix("k_proj") { w = LlamaModel.permuteRoPERows(w, heads: config.kvHeads) }
            try bytes.withUnsafeMutableBytes { raw in
                guard let base = raw.baseAddress else { return }
                do {
                    try info.type.quantize(w.pointer, into: base + info.offset, count: info.elementCount)
                } catch let e as GraftError {
                    throw GraftError(e.code, "\(info.name): \(e.message)")
                }
            }
        }
        return bytes
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
            if file == "config.json", let classifier = taskModel as? SequenceClassificationTaskModel {
                guard var config = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any] else {
                    throw GraftError.format("\(path): not a JSON object")
                }
                config["architectures"] = ["BertForSequenceClassification"]
                // transformers' names for the classes: the ones the data or the adapter gave, else LABEL_i.
                let names = classifier.labelNames ?? (0..<classifier.numLabels).map { "LABEL_\($0)" }
                config["id2label"] = ClassLabelFile.id2label(names)
                config["label2id"] = Dictionary(uniqueKeysWithValues: names.enumerated().map { ($0.element, $0.offset) })
                bytes = [UInt8](try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys]))
            }
            out.append((file, bytes))
        }
        return out
    }
}
