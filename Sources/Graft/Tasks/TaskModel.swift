import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// A model loaded for one task: what a ``GraftSession`` runs, trains, describes and generates with, whatever the
/// architecture underneath. Each conforming type answers for one (architecture, task) pair, so the rest of Graft
/// never asks which backbone or head it holds.
public protocol TaskModel: AnyObject {
    /// The task it was built for.
    var task: SessionTask { get }
    /// The module adapters attach under (Hugging Face names below it).
    var root: Module { get }
    /// Token ids run through the model are in `0..<vocabularySize`.
    var vocabularySize: Int { get }
    /// The width of the final hidden states.
    var hiddenSize: Int { get }
    /// PEFT's `task_type` for adapters created on this model.
    var peftTaskType: String { get }
    /// Sizes for a description (`vocab_size`, `hidden_size`, `num_layers`, ...), as transformers' config names them.
    var configDescription: [String: Any] { get }

    /// Final hidden states `[batch, length, hiddenSize]`.
    func hiddenStates(_ batch: TokenBatch) throws -> Tensor
    /// Floats of logits per batch row for rows of `stride` tokens; throws when the model has no head.
    func logitsPerRow(stride: Int) throws -> Int
    /// Logits `[batch, logitsPerRow]` flattened; throws when the model has no head.
    func logits(_ batch: TokenBatch) throws -> Tensor
    /// What training minimizes; throws when the task has no objective.
    func objective() throws -> any TrainingObjective
    /// Training examples from `batch` and its caller-supplied labels (one class per row, or Hugging Face-style
    /// per-token labels `[batch * stride]` with -100 for unscored positions; nil = what the task implies).
    func examples(batch: TokenBatch, labels: [Int32]?) throws -> [TokenizedExample]
    /// Training examples from text data of the kind the task trains on, tokenized and truncated to `maxLength`.
    func examples(_ data: TextData, tokenizer: any Tokenizer, maxLength: Int) throws -> [TokenizedExample]
    /// Reads a JSONL data file of the kind the task trains on (`source` names it in errors).
    func loadData(path: String) throws -> TextData
    /// The decoder that generation runs on; throws for an encoder.
    func decoder() throws -> LlamaModel
}

/// Text examples before tokenization, of the kind a task trains on.
public enum TextData: Sendable {
    /// Texts with class indices (sequence classification).
    case labeled([LabeledText])
    /// Prompt/completion pairs (causal language modelling; a bare text is a completion with no prompt).
    case completions([TextCompletion])

    /// The number of examples.
    public var count: Int {
        switch self {
        case .labeled(let items): return items.count
        case .completions(let items): return items.count
        }
    }

    /// `n` examples spread evenly over the data (files are often sorted by label, so a prefix is not a sample).
    public func spaced(_ n: Int) -> TextData {
        func pick<T>(_ items: [T]) -> [T] {
            guard n > 0, n < items.count else { return items }
            return (0..<n).map { items[$0 * items.count / n] }
        }
        switch self {
        case .labeled(let items): return .labeled(pick(items))
        case .completions(let items): return .completions(pick(items))
        }
    }
}

/// Builds the ``TaskModel`` for a loaded model and a task: the one place that pairs an architecture with a task.
public enum TaskModels {
    /// The task model for `task` on `model`; `numLabels` and `seed` shape and draw a classification head, and
    /// `labelNames` (when given) name its classes. Throws naming the model when the pair does not exist.
    public static func make(model: GraftModel, task: SessionTask, numLabels: Int, seed: UInt64,
                            labelNames: [String]? = nil) throws -> any TaskModel {
        switch (model.backbone, task) {
        case (.encoder(let bert), .base):
            return EncoderTaskModel(bert: bert)
        case (.encoder(let bert), .sequenceClassification):
            return try SequenceClassificationTaskModel(bert: bert, numLabels: numLabels, seed: seed, labelNames: labelNames)
        case (.decoder(let llama), .base), (.decoder(let llama), .causalLM):
            return CausalLMTaskModel(llama: llama, task: task)
        case (.decoder, .sequenceClassification):
            throw GraftError(.unsupported, "\(model.path): sequence classification needs an encoder (BERT); this is a llama decoder")
        case (.encoder, .causalLM):
            throw GraftError(.unsupported, "\(model.path): causal LM needs a decoder (Llama, a .gguf file); this is a bert encoder")
        }
    }
}
