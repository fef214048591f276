import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// A Llama decoder, loaded bare (``SessionTask/base``) or for causal language modelling: logits over the
/// vocabulary at every position, trained on next-token prediction either way.
public final class CausalLMTaskModel: TaskModel {
    /// The decoder.
    public let llama: LlamaModel
    public let task: SessionTask

    /// Wraps `llama` for `task`.
    public init(llama: LlamaModel, task: SessionTask) {
        self.llama = llama
        self.task = task
    }

    public var root: Module { llama }
    public var vocabularySize: Int { llama.config.vocabSize }
    public var hiddenSize: Int { llama.config.hiddenSize }
    public var peftTaskType: String { "CAUSAL_LM" }
    public var configDescription: [String: Any] {
        let c = llama.config
        return ["vocab_size": c.vocabSize, "hidden_size": c.hiddenSize, "num_layers": c.layers, "num_heads": c.heads,
                "num_kv_heads": c.kvHeads, "intermediate_size": c.intermediateSize, "max_positions": c.contextLength]
    }

    public func hiddenStates(_ batch: TokenBatch) throws -> Tensor { try llama.hiddenStates(batch) }

    public func logitsPerRow(stride: Int) throws -> Int {
        let (n, overflow) = stride.multipliedReportingOverflow(by: llama.config.vocabSize)
        guard !overflow else { throw GraftError.invalid("logits of \(stride) positions × \(llama.config.vocabSize) are too large") }
        return n
    }

    public func logits(_ batch: TokenBatch) throws -> Tensor { try llama.logits(batch) }

    public func objective() throws -> any TrainingObjective { CausalLMObjective(model: llama) }

    public func examples(batch: TokenBatch, labels: [Int32]?) throws -> [TokenizedExample] {
        let stride = batch.length, vocab = llama.config.vocabSize
        if let labels, labels.count != batch.batchSize * stride {
            throw GraftError.invalid("labels: \(labels.count) per-token labels for \(batch.batchSize) rows × \(stride) positions")
        }
        let out = try (0..<batch.batchSize).map { b -> TokenizedExample in
            let ids = Array(batch.row(b))
            var targets = [Int32](repeating: -100, count: ids.count)
            for t in 0..<max(0, ids.count - 1) {
                let label = labels.map { $0[b * stride + t + 1] } ?? ids[t + 1]
                guard label == -100 || (label >= 0 && Int(label) < vocab) else {
                    throw GraftError.invalid("labels[\(b * stride + t + 1)] = \(label) is neither -100 nor a token id in 0..<\(vocab)")
                }
                targets[t] = label
            }
            return TokenizedExample(ids: ids, targets: targets)
        }
        guard out.contains(where: { $0.targets.contains { $0 != -100 } }) else {
            throw GraftError.invalid("labels: no token of the batch is scored (every label is -100, or every sequence has one token)")
        }
        return out
    }

    public func examples(_ data: TextData, tokenizer: any Tokenizer, maxLength: Int) throws -> [TokenizedExample] {
        guard case .completions(let pairs) = data else {
            throw GraftError.invalid("causal LM trains on {\"prompt\", \"completion\"} or {\"text\"} examples, not labelled texts")
        }
        return try ExampleTokenizer.causalLM(pairs, tokenizer: tokenizer, maxLength: maxLength)
    }

    public func loadData(path: String) throws -> TextData { .completions(try JSONLDataset.loadCompletions(path: path)) }

    public func decoder() throws -> LlamaModel { llama }
}
