import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// What a ``GraftSession`` is loaded for: the bare model, a classifier head, or a causal language model.
public enum SessionTask: Int32, Sendable, CaseIterable {
    /// The bare model (BERT hidden states, Llama logits).
    case base = 0
    /// BERT with a classification head (`BertForSequenceClassification`).
    case sequenceClassification = 1
    /// A Llama decoder trained on next-token prediction.
    case causalLM = 2

    /// The name used in JSON descriptions.
    public var name: String {
        switch self {
        case .base: return "base"
        case .sequenceClassification: return "sequence_classification"
        case .causalLM: return "causal_lm"
        }
    }

    /// Every spelling a front door accepts for each task (the CLI's `seq-cls`, the bindings' `seq_cls`, the
    /// JSON name, PEFT's `SEQ_CLS`), compared without case. The one task vocabulary of Graft: the CLI, the
    /// daemon's clients and the Python and Lua bindings accept exactly these.
    public static let aliases: [(name: String, task: SessionTask)] = [
        ("base", .base),
        ("seq-cls", .sequenceClassification), ("seq_cls", .sequenceClassification),
        ("sequence_classification", .sequenceClassification),
        ("causal-lm", .causalLM), ("causal_lm", .causalLM),
    ]

    /// The task spelled `name` (any of ``aliases``, ignoring case); nil for anything else.
    public init?(name: String) {
        let key = name.lowercased()
        guard let hit = Self.aliases.first(where: { $0.name == key }) else { return nil }
        self = hit.task
    }

    /// The accepted spellings joined for error messages.
    public static var aliasList: String { aliases.map(\.name).joined(separator: ", ") }
}

/// What ``GraftSession/forward(batch:adapterIds:output:)`` returns.
public enum SessionOutput: Int32, Sendable {
    /// Final hidden states `[batch, stride, hidden]`.
    case hidden = 1
    /// Logits: `[batch, stride, vocab]` (Llama) or `[batch, numLabels]` (sequence classification).
    case logits = 2
}

/// A model loaded for a task with its adapters: the object behind the C ABI's `graft_model` handle (and usable
/// from Swift directly). Owns the ``GraftModel``, the task model (classifier or decoder) and the
/// ``AdaptedModel`` wrapping it. Use from one thread at a time.
public final class GraftSession: @unchecked Sendable {
    /// The base model and tokenizer.
    public let model: GraftModel
    /// The task it was loaded for.
    public let task: SessionTask
    /// The classification model, for ``SessionTask/sequenceClassification``.
    public let classifier: BertForSequenceClassification?
    /// The task model wrapped for adapters (its root is the classifier, the encoder or the decoder).
    public let adapted: AdaptedModel
    /// Adapter names that live trainers train (a trained adapter cannot be deleted).
    public internal(set) var adaptersInTraining: [String: Int] = [:]

    /// Loads the model at `path` (a path, or an asset name ``resolveModelPath(_:)`` knows: `minilm`,
    /// `smollm2`) for `task`; `numLabels` and `seed` shape and draw the classification head.
    public init(path: String, task: SessionTask, numLabels: Int = 2, seed: UInt64 = 0) throws {
        model = try GraftModel(path: Self.resolveModelPath(path))
        self.task = task
        switch task {
        case .base:
            classifier = nil
            adapted = AdaptedModel(root: model.root)
        case .sequenceClassification:
            guard let bert = model.bert else {
                throw GraftError(.unsupported, "\(path): sequence classification needs an encoder (BERT); this is a \(model.architecture.rawValue) model")
            }
            let cls = try BertForSequenceClassification(bert: bert, numLabels: numLabels, seed: seed)
            classifier = cls
            adapted = AdaptedModel(root: cls)
        case .causalLM:
            guard model.llama != nil else {
                throw GraftError(.unsupported, "\(path): causal LM needs a decoder (Llama, a .gguf file); this is a \(model.architecture.rawValue) model")
            }
            classifier = nil
            adapted = AdaptedModel(root: model.root)
        }
    }

    // MARK: description

    /// The model described as a JSON object (architecture, sizes, parameter count, module tree with shapes).
    public func infoJSON() throws -> String {
        var info: [String: Any] = [
            "architecture": model.architecture.rawValue, "path": model.path, "task": task.name,
            "parameters": adapted.root.parameterCount,
        ]
        if let bert = model.bert {
            let c = bert.config
            info["vocab_size"] = c.vocabSize; info["hidden_size"] = c.hiddenSize; info["num_layers"] = c.layers
            info["num_heads"] = c.heads; info["intermediate_size"] = c.intermediateSize
            info["max_positions"] = c.maxPositions
        } else if let llama = model.llama {
            let c = llama.config
            info["vocab_size"] = c.vocabSize; info["hidden_size"] = c.hiddenSize; info["num_layers"] = c.layers
            info["num_heads"] = c.heads; info["num_kv_heads"] = c.kvHeads
            info["intermediate_size"] = c.intermediateSize; info["max_positions"] = c.contextLength
        }
        if let classifier { info["num_labels"] = classifier.numLabels }
        info["modules"] = Self.describe(adapted.root, name: "", path: "")
        return try Self.jsonString(info)
    }

    private static func describe(_ module: Module, name: String, path: String) -> [String: Any] {
        var node: [String: Any] = [
            "name": name, "path": path, "type": module.typeName, "parameter_count": module.parameterCount,
            "parameters": module.localParameters.map { ["name": $0.name, "shape": $0.tensor.shape] as [String: Any] },
        ]
        if !module.children.isEmpty {
            node["children"] = module.children.map {
                describe($0.module, name: $0.name, path: path.isEmpty ? $0.name : path + "." + $0.name)
            }
        }
        return node
    }

    /// Serializes a JSON-compatible value (sorted keys, compact).
    public static func jsonString(_ value: Any) throws -> String {
        guard JSONSerialization.isValidJSONObject(value) else {
            throw GraftError(.internalError, "cannot serialize a description to JSON")
        }
        let data = try JSONSerialization.data(withJSONObject: value, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// The adapters as JSON: active name, enabled flag, and one entry per adapter in id order.
    public func adapterListJSON() throws -> String {
        let list: [[String: Any]] = adapted.adapters.enumerated().map { i, a in
            [
                "id": i, "name": a.name, "peft_type": a.config.peftType, "active": a.name == adapted.activeAdapter,
                "merged": a.state.isMerged, "layers": a.layers.count, "trainable_parameters": a.parameterCount,
                "config": a.config.json,
            ]
        }
        return try Self.jsonString([
            "active": adapted.activeAdapter.map { $0 as Any } ?? NSNull(), "enabled": !adapted.adaptersDisabled,
            "adapters": list,
        ] as [String: Any])
    }

    // MARK: adapters

    /// Adds adapter `name` from PEFT-shaped JSON text (`task_type` and `base_model_name_or_path` filled in
    /// when absent) and makes it active.
    public func addAdapter(name: String, configJSON: String, seed: UInt64 = 0) throws {
        var config = try AdapterConfig(jsonText: configJSON, source: "adapter config '\(name)'")
        if config.json["task_type"] == nil {
            config.json["task_type"] = task == .sequenceClassification ? "SEQ_CLS" : (model.llama != nil ? "CAUSAL_LM" : "FEATURE_EXTRACTION")
        }
        if config.json["base_model_name_or_path"] == nil || config.json["base_model_name_or_path"] is NSNull {
            config.json["base_model_name_or_path"] = Self.baseModelReference(model.path)
        }
        try adapted.addAdapter(name, config: config, seed: seed)
    }

    /// Deletes adapter `name` unless a live trainer trains it.
    public func deleteAdapter(name: String) throws {
        _ = try adapted.adapter(name)
        if adaptersInTraining[name, default: 0] > 0 {
            throw GraftError(.state, "adapter '\(name)' is being trained; free its trainer before deleting it")
        }
        try adapted.deleteAdapter(name)
    }

    // MARK: inference

    /// A `[batch, stride]` token batch from raw rows, validated (lengths in 1...stride, ids in the vocabulary).
    public func tokenBatch(ids: [Int32], lengths: [Int]?, batch: Int, stride: Int) throws -> TokenBatch {
        guard batch >= 1 else { throw GraftError.invalid("batch must be ≥ 1, got \(batch)") }
        guard stride >= 1 else { throw GraftError.invalid("stride must be ≥ 1, got \(stride)") }
        if let lengths, let bad = lengths.firstIndex(where: { $0 < 1 || $0 > stride }) {
            throw GraftError.invalid("lengths[\(bad)] = \(lengths[bad]) is outside 1...\(stride) (stride)")
        }
        let vocab = model.tokenizer.vocabularySize
        let lens = lengths ?? [Int](repeating: stride, count: batch)
        for b in 0..<batch {
            for t in 0..<lens[b] {
                let id = ids[b * stride + t]
                if id < 0 || Int(id) >= vocabSize(fallback: vocab) {
                    throw GraftError.invalid("ids[\(b * stride + t)] (row \(b), position \(t)) = \(id) is outside the vocabulary 0..<\(vocabSize(fallback: vocab))")
                }
            }
        }
        // Padding is never read by the model; make it a valid id so nothing downstream trips over it.
        var clean = ids
        for b in 0..<batch where lens[b] < stride { for t in lens[b]..<stride { clean[b * stride + t] = 0 } }
        return try TokenBatch(ids: clean, batchSize: batch, length: stride, lengths: lens)
    }

    private func vocabSize(fallback: Int) -> Int {
        model.bert?.config.vocabSize ?? model.llama?.config.vocabSize ?? fallback
    }

    /// The number of floats ``forward(batch:adapterIds:output:)`` returns, or a throw when
    /// the output kind does not exist for this model.
    public func outputCount(batch: Int, stride: Int, output: SessionOutput) throws -> Int {
        let width: Int
        switch output {
        case .hidden:
            width = stride * (model.bert?.config.hiddenSize ?? model.llama?.config.hiddenSize ?? 0)
        case .logits:
            if let classifier {
                width = classifier.numLabels
            } else if let llama = model.llama {
                width = stride * llama.config.vocabSize
            } else {
                throw GraftError(.unsupported, "logits: a BERT model loaded as base has no head; load it for sequence classification, or ask for hidden states")
            }
        }
        let (n, overflow) = batch.multipliedReportingOverflow(by: width)
        guard !overflow else { throw GraftError.invalid("output of \(batch) rows × \(width) floats is too large") }
        return n
    }

    /// Runs the batch without recording and returns the output flattened as documented for
    /// `graft_model_forward`.
    ///
    /// `adapterIds` (one per batch row, -1 = base; nil = the current adapter state for every row) makes a
    /// mixed-adapter batch: rows are grouped by adapter, the model runs once with each adapted layer's base GEMM
    /// over the whole batch and each adapter's work on its own rows (see ``MixedAdapterBatch``), and the output
    /// comes back in the caller's row order. Methods that cannot mix (virtual tokens, LN tuning, trainable
    /// tokens) and merged adapters throw.
    public func forward(batch tokens: TokenBatch, adapterIds: [Int32]?, output: SessionOutput) throws -> [Float] {
        let count = try outputCount(batch: tokens.batchSize, stride: tokens.length, output: output)
        guard let adapterIds else { return try forwardRows(tokens, output: output) }
        guard adapterIds.count == tokens.batchSize else {
            throw GraftError.invalid("\(adapterIds.count) adapter ids for \(tokens.batchSize) rows")
        }
        let plan = try AdapterBatchPlan(adapterIds: adapterIds, adapterCount: adapted.adapters.count)
        let grouped = try plan.gather(tokens)
        let values = try MixedAdapterBatch.withRouting(adapted, ids: plan.sortedIds) { try forwardRows(grouped, output: output) }
        return plan.scatter(values, perRow: count / max(tokens.batchSize, 1))
    }

    private func forwardRows(_ batch: TokenBatch, output: SessionOutput) throws -> [Float] {
        try withNoGrad {
            let t: Tensor
            switch output {
            case .hidden:
                if let bert = model.bert { t = try bert.forward(batch) }
                else if let llama = model.llama { t = try llama.hiddenStates(batch) }
                else { throw GraftError(.internalError, "model has no architecture") }
            case .logits:
                if let classifier { return try classifier.forward(batch).scalars }
                guard let llama = model.llama else {
                    throw GraftError(.unsupported, "logits: a BERT model loaded as base has no head")
                }
                t = try llama.logits(batch)
            }
            // Zero the padding positions so the output does not depend on what the caller put there.
            var values = t.scalars
            let width = values.count / max(batch.batchSize * batch.length, 1)
            for b in 0..<batch.batchSize where batch.lengths[b] < batch.length {
                let start = (b * batch.length + batch.lengths[b]) * width, end = (b + 1) * batch.length * width
                values.replaceSubrange(start..<end, with: repeatElement(0, count: end - start))
            }
            return values
        }
    }

    /// The decoder, and `parameters` with the model's end-of-sequence / end-of-turn tokens as stop tokens when
    /// `stopAtEOS`; throws for an encoder.
    private func generationSetup(_ parameters: GenerationParameters, stopAtEOS: Bool) throws -> (LlamaModel, GenerationParameters) {
        guard let llama = model.llama else {
            throw GraftError(.unsupported, "\(model.path): generation needs a decoder model (Llama); this is a \(model.architecture.rawValue) encoder")
        }
        var params = parameters
        if stopAtEOS {
            for t in ["<|im_end|>", "<|endoftext|>"] { if let id = model.tokenizer.id(of: t) { params.stopTokens.insert(id) } }
            if let eos = model.tokenizer.eosTokenId { params.stopTokens.insert(eos) }
        }
        return (llama, params)
    }

    /// Generates after each of `prompts` with its own adapter (`adapterIds[i]`, -1 = base) as one batch (Llama
    /// only); see ``MixedAdapterBatch/generate(_:llama:prompts:adapterIds:parameters:onToken:)``. Stop tokens
    /// end a sequence and are not returned when `stopAtEOS`. `onToken(sequence, token)` returning false stops
    /// that sequence. Returns the new tokens per prompt, in the caller's order.
    public func generate(prompts: [[Int32]], adapterIds: [Int32], parameters: GenerationParameters, stopAtEOS: Bool,
                         onToken: (Int, Int32) -> Bool = { _, _ in true }) throws -> [[Int32]] {
        let (llama, params) = try generationSetup(parameters, stopAtEOS: stopAtEOS)
        for (i, prompt) in prompts.enumerated() {
            if let bad = prompt.firstIndex(where: { $0 < 0 || Int($0) >= llama.config.vocabSize }) {
                throw GraftError.invalid("prompts[\(i)][\(bad)] = \(prompt[bad]) is outside the vocabulary 0..<\(llama.config.vocabSize)")
            }
        }
        let out = try MixedAdapterBatch.generate(adapted, llama: llama, prompts: prompts, adapterIds: adapterIds, parameters: params) { i, id in
            params.stopTokens.contains(id) || onToken(i, id)
        }
        return out.map { $0.filter { !params.stopTokens.contains($0) } }
    }

    /// Generates after `prompt` (Llama only). `onToken` sees each token and the text it completes; returning
    /// false stops. Stop tokens (EOS, end of turn) end generation and are not reported when `stopAtEOS`.
    public func generate(prompt: [Int32], parameters: GenerationParameters, stopAtEOS: Bool,
                         onToken: (Int32, String) -> Bool) throws -> [Int32] {
        let (llama, params) = try generationSetup(parameters, stopAtEOS: stopAtEOS)
        if let bad = prompt.firstIndex(where: { $0 < 0 || Int($0) >= llama.config.vocabSize }) {
            throw GraftError.invalid("prompt[\(bad)] = \(prompt[bad]) is outside the vocabulary 0..<\(llama.config.vocabSize)")
        }
        var emitted: [Int32] = []
        var printed = ""
        let ids = try llama.generate(prompt: prompt, parameters: params) { id in
            if params.stopTokens.contains(id) { return false }
            emitted.append(id)
            let text = model.tokenizer.decode(emitted, skipSpecialTokens: false)
            var piece = ""
            // Report only complete characters: hold back while the tail is an incomplete UTF-8 sequence.
            if text.hasPrefix(printed), !text.hasSuffix("\u{FFFD}") {
                piece = String(text.dropFirst(printed.count))
                printed = text
            }
            return onToken(id, piece)
        }
        return ids.filter { !params.stopTokens.contains($0) }
    }
}

extension GraftSession {
    /// A model argument resolved: an existing path as is, else an asset name fetched by scripts/fetch-assets
    /// (`minilm`, `smollm2`) as its path in the cache; anything else unchanged (loading then names it).
    public static func resolveModelPath(_ name: String) -> String {
        if FileManager.default.fileExists(atPath: name) { return name }
        switch name.lowercased() {
        case "minilm", "all-minilm-l6-v2": return assetPath("all-MiniLM-L6-v2")
        case "smollm2", "smollm2-135m": return assetPath("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        default: return name
        }
    }

    /// What an adapter's `base_model_name_or_path` records for a model loaded from `path`, so PEFT can find the
    /// base again: the Hugging Face hub id of the models fetched as assets (the files are those models'), else
    /// the absolute path.
    public static func baseModelReference(_ path: String) -> String {
        let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
        if absolute == URL(fileURLWithPath: assetPath("all-MiniLM-L6-v2")).standardizedFileURL.path {
            return "sentence-transformers/all-MiniLM-L6-v2"
        }
        if absolute == URL(fileURLWithPath: assetPath("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).standardizedFileURL.path {
            return "HuggingFaceTB/SmolLM2-135M-Instruct"
        }
        return absolute
    }

    /// The chat template of the supported instruct decoders (ChatML) around one user turn: the one
    /// implementation behind `graft generate` (unless `--raw`), graftd's `chat` flag and the C ABI's
    /// `graft_chat_template_apply`.
    public static func chatPrompt(_ user: String) -> String {
        "<|im_start|>user\n\(user)<|im_end|>\n<|im_start|>assistant\n"
    }

    /// ``chatPrompt(_:)`` for this model: throws for an encoder, which has no chat template.
    public func chatPrompt(_ user: String) throws -> String {
        guard model.llama != nil else {
            throw GraftError(.unsupported, "\(model.path): a chat template needs a decoder model (Llama); this is a \(model.architecture.rawValue) encoder")
        }
        return Self.chatPrompt(user)
    }

    /// `${GRAFT_HOME:-$HOME/.cache/graft}/relative`.
    public static func assetPath(_ relative: String) -> String {
        let home = ProcessInfo.processInfo.environment["GRAFT_HOME"] ?? (NSHomeDirectory() + "/.cache/graft")
        return home + "/" + relative
    }
}
