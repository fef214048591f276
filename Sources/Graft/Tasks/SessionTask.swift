import Foundation

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

    /// The task spelled `name` that has a training objective (sequence classification or causal LM); throws
    /// naming the value for anything else, including `base`.
    public init(trainingTaskName name: String) throws {
        guard let task = SessionTask(name: name) else {
            throw GraftError.invalid("task '\(name)' is not one of \(Self.aliasList)")
        }
        guard task != .base else { throw GraftError.invalid("task '\(name)' has no training objective; train seq-cls or causal-lm") }
        self = task
    }

    /// The accepted spellings joined for error messages.
    public static var aliasList: String { aliases.map(\.name).joined(separator: ", ") }
}
