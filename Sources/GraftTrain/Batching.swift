import GraftModels
import GraftTensor
import GraftText

/// One tokenized training example.
public struct TokenizedExample: Sendable, Equatable {
    /// Token ids, special tokens included.
    public var ids: [Int32]
    /// The class index (sequence classification); -1 when unused.
    public var label: Int32
    /// Next-token targets per position (causal LM), `-100` where no loss is taken; empty when unused.
    public var targets: [Int32]
    /// The example's task for task-routed adapters (Poly / MHR); -1 when unused.
    public var taskID: Int32

    /// Creates an example.
    public init(ids: [Int32], label: Int32 = -1, targets: [Int32] = [], taskID: Int32 = -1) {
        self.ids = ids
        self.label = label
        self.targets = targets
        self.taskID = taskID
    }
}

/// Turns text datasets into token ids the way transformers' tokenizers do for these tasks.
public enum ExampleTokenizer {
    /// `[CLS] text [SEP]`, truncated to `maxLength` tokens (the text is cut, the special tokens kept).
    public static func classification(_ examples: [LabeledText], tokenizer: any Tokenizer, maxLength: Int) throws -> [TokenizedExample] {
        guard maxLength >= 3 else { throw GraftError.invalid("max length \(maxLength) leaves no room for text between [CLS] and [SEP]") }
        guard let cls = tokenizer.clsTokenId ?? tokenizer.bosTokenId, let sep = tokenizer.sepTokenId ?? tokenizer.eosTokenId else {
            throw GraftError(.unsupported, "sequence classification needs a tokenizer with [CLS]/[SEP] (or BOS/EOS) tokens")
        }
        return examples.map { e in
            let body = tokenizer.encode(e.text, addSpecialTokens: false).prefix(maxLength - 2)
            return TokenizedExample(ids: [cls] + body + [sep], label: Int32(e.label))
        }
    }

    /// `prompt + completion (+ EOS)`, trained only on the completion (and EOS) when a prompt is given,
    /// truncated to `maxLength` tokens. Targets are already shifted: position `t` predicts token `t + 1`.
    public static func causalLM(_ examples: [TextCompletion], tokenizer: any Tokenizer, maxLength: Int, appendEOS: Bool = true) throws -> [TokenizedExample] {
        guard maxLength >= 2 else { throw GraftError.invalid("max length must be at least 2 for language modelling, got \(maxLength)") }
        return examples.map { e in
            let prompt = e.prompt.isEmpty ? [] : tokenizer.encode(e.prompt, addSpecialTokens: false)
            var completion = tokenizer.encode(e.completion, addSpecialTokens: false)
            if appendEOS, let eos = tokenizer.eosTokenId { completion.append(eos) }
            let ids = Array((prompt + completion).prefix(maxLength))
            var targets = [Int32](repeating: -100, count: ids.count)
            for t in 0..<max(0, ids.count - 1) where t + 1 >= prompt.count {
                targets[t] = ids[t + 1]
            }
            return TokenizedExample(ids: ids, targets: targets)
        }
    }
}

/// Sequences packed end to end into one row: no padding, attention kept inside each sequence by segment ids,
/// positions restarting at 0 for every sequence.
public struct PackedBatch: Sendable {
    /// The packed row (`batchSize` 1).
    public let tokens: TokenBatch
    /// Flat index of each sequence's first token (what a classifier pools).
    public let firstTokens: [Int32]
    /// Class labels, one per sequence.
    public let labels: [Int32]
    /// Next-token targets, one per token (`-100` = no loss); empty for classification.
    public let targets: [Int32]
    /// Task ids, one per sequence (Poly / MHR routing); empty when no example carries one.
    public let taskIDs: [Int32]
    /// Number of sequences.
    public var sequenceCount: Int { firstTokens.count }
    /// Number of token slots (padding included for a padded batch).
    public var tokenCount: Int { tokens.ids.count }
    /// Whether the sequences share one row (false: one padded row per sequence, for virtual-token methods).
    public let isPacked: Bool
    /// Real tokens (padding excluded).
    public var realTokenCount: Int { tokens.lengths.reduce(0, +) }

    /// `examples` packed into one row, or with `padded` one row per sequence padded to the longest (prompt and
    /// prefix methods prepend virtual tokens to each sequence, so they need rows of their own).
    public init(_ examples: ArraySlice<TokenizedExample>, padded: Bool) throws {
        guard padded else {
            try self.init(examples)
            return
        }
        guard !examples.isEmpty else { throw GraftError.invalid("cannot batch an empty set of examples") }
        let length = examples.map(\.ids.count).max() ?? 0
        var ids: [Int32] = [], lengths: [Int] = [], labels: [Int32] = [], targets: [Int32] = []
        let lm = examples.contains { !$0.targets.isEmpty }
        for (s, e) in examples.enumerated() {
            guard !e.ids.isEmpty else { throw GraftError.invalid("example \(s) of the batch has no tokens") }
            ids += e.ids + [Int32](repeating: 0, count: length - e.ids.count)
            lengths.append(e.ids.count)
            labels.append(e.label)
            if lm {
                guard e.targets.count == e.ids.count else {
                    throw GraftError.invalid("example \(s): \(e.targets.count) targets for \(e.ids.count) tokens")
                }
                targets += e.targets + [Int32](repeating: -100, count: length - e.ids.count)
            }
        }
        self.init(tokens: try TokenBatch(ids: ids, batchSize: examples.count, length: length, lengths: lengths),
                  firstTokens: (0..<examples.count).map { Int32($0 * length) }, labels: labels, targets: targets,
                  isPacked: false, taskIDs: PackedBatch.taskIDs(examples))
    }

    /// The examples' task ids, or none when no example has one (−1 elsewhere counts as task 0).
    static func taskIDs(_ examples: ArraySlice<TokenizedExample>) -> [Int32] {
        examples.contains { $0.taskID >= 0 } ? examples.map { max($0.taskID, 0) } : []
    }

    private init(tokens: TokenBatch, firstTokens: [Int32], labels: [Int32], targets: [Int32], isPacked: Bool, taskIDs: [Int32]) {
        self.taskIDs = taskIDs
        self.tokens = tokens
        self.firstTokens = firstTokens
        self.labels = labels
        self.targets = targets
        self.isPacked = isPacked
    }

    /// Packs `examples` (at least one, none empty).
    public init(_ examples: ArraySlice<TokenizedExample>) throws {
        guard !examples.isEmpty else { throw GraftError.invalid("cannot pack an empty batch") }
        var ids: [Int32] = [], positions: [Int32] = [], segments: [Int32] = [], first: [Int32] = []
        var labels: [Int32] = [], targets: [Int32] = []
        let lm = examples.contains { !$0.targets.isEmpty }
        for (s, e) in examples.enumerated() {
            guard !e.ids.isEmpty else { throw GraftError.invalid("example \(s) of the batch has no tokens") }
            first.append(Int32(ids.count))
            ids += e.ids
            positions += (0..<e.ids.count).map(Int32.init)
            segments += [Int32](repeating: Int32(s), count: e.ids.count)
            labels.append(e.label)
            if lm {
                guard e.targets.count == e.ids.count else {
                    throw GraftError.invalid("example \(s): \(e.targets.count) targets for \(e.ids.count) tokens")
                }
                targets += e.targets
            }
        }
        self.init(tokens: try TokenBatch(ids: ids, batchSize: 1, length: ids.count, positions: positions, segments: segments),
                  firstTokens: first, labels: labels, targets: targets, isPacked: true, taskIDs: PackedBatch.taskIDs(examples))
    }
}
