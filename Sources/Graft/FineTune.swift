import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// Which head and loss a fine-tune uses.
public enum FineTuneTask: String, Sendable, CaseIterable {
    /// BertForSequenceClassification: pooled first token → classifier, cross entropy.
    case sequenceClassification = "seq-cls"
    /// Next-token prediction on a decoder, loss on completions only.
    case causalLM = "causal-lm"

    /// The task spelled `name` in any form ``SessionTask/aliases`` lists (`seq-cls`, `seq_cls`,
    /// `sequence_classification`, `causal-lm`, `causal_lm`); throws naming the value for anything else,
    /// including `base`, which has no training objective.
    public init(name: String) throws {
        switch SessionTask(name: name) {
        case .sequenceClassification?: self = .sequenceClassification
        case .causalLM?: self = .causalLM
        case .base?: throw GraftError.invalid("task '\(name)' has no training objective; train seq-cls or causal-lm")
        case nil: throw GraftError.invalid("task '\(name)' is not one of \(SessionTask.aliasList)")
        }
    }
}

/// Everything one fine-tuning run needs; `graft demo`, `graft train` and the bindings fill it.
public struct FineTuneSpec: @unchecked Sendable {
    /// Model path (transformers BERT directory or Llama GGUF).
    public var modelPath: String
    /// Task.
    public var task: FineTuneTask
    /// Adapter configuration in PEFT's `adapter_config.json` shape.
    public var adapterConfig: [String: Any]
    /// Number of classes (classification).
    public var numLabels: Int = 3
    /// Longest sequence in tokens; longer ones are truncated.
    public var maxLength: Int = 64
    /// Optimizer, schedule and batching.
    public var trainer: TrainerConfig
    /// Where to save the adapter (PEFT format); nil = do not save.
    public var outputDirectory: String?
    /// A step budget that overrides `trainer.epochs` (transformers' `max_steps`); nil = epochs.
    public var maxSteps: Int?

    /// Creates a spec.
    public init(modelPath: String, task: FineTuneTask, adapterConfig: [String: Any], trainer: TrainerConfig) {
        self.modelPath = modelPath
        self.task = task
        self.adapterConfig = adapterConfig
        self.trainer = trainer
    }
}

/// A model, an adapter and a trainer assembled from a ``FineTuneSpec``.
public final class FineTuneSession {
    /// The loaded base model and tokenizer.
    public let model: GraftModel
    /// The base model wrapped for adapters (its root is the task model).
    public let adapted: AdaptedModel
    /// The trainer.
    public let trainer: Trainer
    /// The spec it was built from.
    public let spec: FineTuneSpec
    /// The classification model, for `seqCls`.
    public let classifier: BertForSequenceClassification?

    /// Loads the model, attaches the adapter (`"default"`) and builds the trainer.
    public init(spec: FineTuneSpec) throws {
        self.spec = spec
        model = try GraftModel(path: spec.modelPath)
        let objective: TrainingObjective
        switch spec.task {
        case .sequenceClassification:
            guard let bert = model.bert else {
                throw GraftError(.unsupported, "\(spec.modelPath): sequence classification needs an encoder (BERT); this is a \(model.architecture.rawValue) model")
            }
            let cls = try BertForSequenceClassification(bert: bert, numLabels: spec.numLabels, seed: spec.trainer.seed)
            classifier = cls
            adapted = AdaptedModel(root: cls)
            objective = SequenceClassificationObjective(model: cls)
        case .causalLM:
            guard let llama = model.llama else {
                throw GraftError(.unsupported, "\(spec.modelPath): causal LM training needs a decoder (Llama); this is a \(model.architecture.rawValue) model")
            }
            classifier = nil
            adapted = AdaptedModel(root: llama)
            objective = CausalLMObjective(model: llama)
        }
        var json = spec.adapterConfig
        if json["task_type"] == nil { json["task_type"] = spec.task == .sequenceClassification ? "SEQ_CLS" : "CAUSAL_LM" }
        if json["base_model_name_or_path"] == nil || json["base_model_name_or_path"] is NSNull {
            json["base_model_name_or_path"] = GraftSession.baseModelReference(spec.modelPath)
        }
        try adapted.addAdapter("default", config: AdapterConfig(json: json, source: "adapter config"), seed: spec.trainer.seed)
        trainer = try Trainer(model: adapted, adapterName: "default", objective: objective, config: spec.trainer)
    }

    /// Tokenizes classification examples with the model's tokenizer.
    public func tokenize(_ examples: [LabeledText]) throws -> [TokenizedExample] {
        if let bad = examples.first(where: { $0.label < 0 || $0.label >= spec.numLabels }) {
            throw GraftError.invalid("label \(bad.label) is outside 0..<\(spec.numLabels) (num_labels) for text \"\(bad.text.prefix(40))\"")
        }
        return try ExampleTokenizer.classification(examples, tokenizer: model.tokenizer, maxLength: spec.maxLength)
    }

    /// Tokenizes prompt/completion examples with the model's tokenizer.
    public func tokenize(_ examples: [TextCompletion]) throws -> [TokenizedExample] {
        try ExampleTokenizer.causalLM(examples, tokenizer: model.tokenizer, maxLength: spec.maxLength)
    }

    /// The adapter's trainable parameter count.
    public var trainableParameters: Int { (try? adapted.adapter("default").parameterCount) ?? 0 }

    /// Saves the adapter in PEFT format to `directory`.
    public func save(to directory: String) throws {
        try adapted.saveAdapter("default", directory: directory)
    }
}
