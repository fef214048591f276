import Foundation
import GraftAdapters
import GraftDistributed
import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// A ``Trainer`` bound to a ``GraftSession`` with the objective its task implies: the one training facade, behind
/// the C ABI's `graft_trainer` handle, graftd's jobs and `graft train`/`graft demo`. Keeps the session alive. Use
/// from one thread at a time (and not concurrently with its session).
///
/// One training step walks: ``step(_:)`` → ``Trainer/accumulate(_:)`` → the task model's objective → the adapted
/// model → each Linear and its adapters → BLAS.
public final class GraftTrainingSession: @unchecked Sendable {
    /// The model.
    public let session: GraftSession
    /// The trainer.
    public let trainer: Trainer
    /// The options the run was created with (validated).
    public let options: TrainingOptions
    private var released = false

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
        let objective = try session.taskModel.objective()
        session.adapted.setAdaptersDisabled(false)
        trainer = try Trainer(model: session.adapted, adapterName: name, objective: objective, config: config)
        // Under mpirun every door's training is data-parallel over MPI_COMM_WORLD (GraftDistributed).
        trainer.processGroup = try ProcessGroups.world()
        var identity = RunFingerprint()
        identity.combine(session.model.architecture.rawValue)
        for (pname, shape) in session.model.root.namedParameterShapes() {
            identity.combine(pname)
            identity.combine(shape)
        }
        trainer.modelIdentity = identity
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

    /// This process's rank among the data-parallel processes (0 alone): only rank 0 should save and report.
    public var rank: Int { trainer.processGroup.rank }
    /// The number of data-parallel processes (1 unless launched by mpirun).
    public var worldSize: Int { trainer.processGroup.size }

    /// The trained adapter's trainable parameter count.
    public var trainableParameters: Int { trainer.adapter.parameterCount }

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

    // MARK: data

    /// Examples from a validated batch (``GraftSession/tokenBatch(ids:lengths:batch:stride:)``). `labels`:
    /// classes (classification, required) or Hugging Face-style per-token labels `[batch * stride]` (causal LM;
    /// nil = every next token).
    public func examples(batch tokens: TokenBatch, labels: [Int32]?) throws -> [TokenizedExample] {
        try session.taskModel.examples(batch: tokens, labels: labels)
    }

    /// Text data tokenized for this task with the model's tokenizer, truncated to ``TrainingOptions/maxLength``.
    public func tokenize(_ data: TextData) throws -> [TokenizedExample] {
        try session.taskModel.examples(data, tokenizer: session.model.tokenizer, maxLength: options.maxLength)
    }

    /// The JSONL file at `path` read for this task, limited to ``TrainingOptions/maxExamples`` examples spread
    /// over it, and tokenized.
    public func loadExamples(_ path: String) throws -> [TokenizedExample] {
        var data = try session.taskModel.loadData(path: path)
        if let maxExamples = options.maxExamples { data = data.spaced(maxExamples) }
        let examples = try tokenize(data)
        guard !examples.isEmpty else { throw GraftError.invalid("\(path): no examples") }
        return examples
    }

    // MARK: training

    /// One micro-batch: forward, backward, and an optimizer update on every `gradientAccumulationSteps`-th call.
    public func step(_ examples: [TokenizedExample]) throws -> Float {
        try prepare()
        if trainer.adapter.pendingDataInitialization != nil {
            // Each rank holds only its share of the batch here; an initialization from shares would differ per rank.
            guard worldSize == 1 else {
                throw GraftError(.unsupported, "adapter '\(trainer.adapter.name)' waits for its data-driven initialization (init_lora_weights \"\(trainer.adapter.pendingDataInitialization?.rawValue ?? "")\"), which step() cannot run data-parallel; train it with train() or initialize it in one process first")
            }
            try initializeFromData([examples])
        }
        let batch = try PackedBatch(ArraySlice(examples), padded: session.adapted.needsPaddedBatches)
        let loss = try trainer.accumulate(batch)
        if trainer.microStep % trainer.config.gradientAccumulationSteps == 0 {
            // No horizon given: a schedule far longer than any run, i.e. no decay after warm-up.
            try trainer.optimizerStep(totalSteps: options.totalSteps > 0 ? options.totalSteps : 1 << 40)
        }
        return loss
    }

    /// Loss and accuracy over `examples` without training.
    public func evaluate(_ examples: [TokenizedExample]) throws -> EvaluationMetrics {
        try prepare()
        return try trainer.evaluate(examples)
    }

    /// Trains over `examples` for the configured epochs, or for ``TrainingOptions/totalSteps`` optimizer steps
    /// when that is set (a budget that overrides the epochs and that the schedule spans). `progress` returning
    /// false stops the run and makes this throw ``GraftError/Code/cancelled``.
    public func train(_ examples: [TokenizedExample], progress: (TrainingProgress) -> Bool) throws {
        try prepare()
        guard !examples.isEmpty else { throw GraftError.invalid("no training examples") }
        let totalSteps = options.totalSteps
        let perEpoch = trainer.batchesPerEpoch(examples.count)
        let finished = totalSteps > 0 ? trainer.globalStep >= totalSteps : trainer.microStep >= trainer.config.epochs * perEpoch
        if finished {
            throw GraftError(.state, "this trainer has finished its run (step \(trainer.globalStep)); create a new trainer to train again")
        }
        if trainer.adapter.pendingDataInitialization != nil {
            // The first init_batches global batches of the first epoch, in the order training takes them: the
            // same examples on every rank, so data-parallel ranks initialize identically.
            let order = trainer.order(epoch: 0, count: examples.count), size = trainer.globalBatchSize
            let batches = stride(from: 0, to: min(examples.count, options.initBatches * size), by: size).map { start in
                order[start..<min(start + size, examples.count)].map { examples[$0] }
            }
            try initializeFromData(batches)
        }
        var cancelled = false
        try trainer.train(examples, maxSteps: totalSteps > 0 ? totalSteps : nil) { p in
            if progress(p) { return true }
            cancelled = true
            return false
        }
        if cancelled { throw GraftError(.cancelled, "training was cancelled by the progress callback at step \(trainer.globalStep)") }
    }

    /// Runs the data-driven initialization the trained adapter was added with (`init_lora_weights` `"eva"`,
    /// `"lora_ga"` or `"corda"`, see ``DataDrivenInitialization``) over `batches`, without dropout, as PEFT's
    /// `initialize_lora_eva_weights`, `preprocess_loraga` and `preprocess_corda` do before training; then
    /// rebinds the trainer to the initialized adapter. ``train(_:progress:)`` and ``step(_:)`` call it before the
    /// first step; an adapter loaded from a file, or a run resumed from a checkpoint, never waits for it.
    public func initializeFromData(_ batches: [[TokenizedExample]]) throws {
        guard trainer.adapter.pendingDataInitialization != nil, trainer.microStep == 0 else { return }
        let adapted = session.adapted
        let packed = try batches.filter { !$0.isEmpty }.map { try PackedBatch(ArraySlice($0), padded: adapted.needsPaddedBatches) }
        guard !packed.isEmpty else { throw GraftError.invalid("no examples to initialize adapter '\(trainer.adapter.name)' from") }
        let objective = trainer.objective
        adapted.setTraining(false)
        try adapted.initializePendingAdapter(trainer.adapter.name) { needsGradients in
            for batch in packed {
                let loss = try objective.loss(batch)
                guard loss.item.isFinite else {
                    throw GraftError.invalid("the loss of a batch used to initialize adapter '\(trainer.adapter.name)' is \(loss.item)")
                }
                if needsGradients { loss.backward() }
            }
        }
        try trainer.rebindAdapter()
    }

    /// ``train(_:progress:)`` over the JSONL file at `path` (see ``loadExamples(_:)``).
    public func train(file path: String, progress: (TrainingProgress) -> Bool) throws {
        try train(try loadExamples(path), progress: progress)
    }
}
