import Foundation
import GraftAdapters
import GraftDistributed
import GraftIO
import GraftTensor

/// How a ``Trainer`` runs.
public struct TrainerConfig: Sendable, Equatable {
    /// The optimizer family.
    public enum OptimizerKind: String, Sendable, CaseIterable {
        /// AdamW with decoupled weight decay.
        case adamw
        /// SGD with momentum.
        case sgd
    }
    /// Passes over the training data.
    public var epochs: Int = 1
    /// Sequences per micro-batch.
    public var batchSize: Int = 32
    /// Micro-batches whose gradients are summed (averaged) before each optimizer step.
    public var gradientAccumulationSteps: Int = 1
    /// Peak learning rate.
    public var learningRate: Float = 1e-3
    /// The optimizer.
    public var optimizer: OptimizerKind = .adamw
    /// AdamW's decoupled decay, or SGD's L2 penalty.
    public var weightDecay: Float = 0.01
    /// AdamW's betas.
    public var beta1: Float = 0.9, beta2: Float = 0.999
    /// AdamW's epsilon.
    public var eps: Float = 1e-8
    /// SGD's momentum.
    public var momentum: Float = 0.9
    /// Learning-rate schedule after warm-up.
    public var schedule: LearningRateSchedule.Kind = .linear
    /// Linear warm-up steps.
    public var warmupSteps: Int = 0
    /// Clip the global gradient norm to this (nil = no clipping).
    public var maxGradNorm: Float? = 1.0
    /// Seed for shuffling and dropout.
    public var seed: UInt64 = 42
    /// Shuffle the training data each epoch.
    public var shuffle: Bool = true
    /// Sequences per evaluation batch.
    public var evalBatchSize: Int = 64

    /// Defaults (AdamW, lr 1e-3, linear decay, clip 1.0, batch 32).
    public init() {}

    /// Throws naming the first field out of range.
    public func validate() throws {
        guard epochs >= 1 else { throw GraftError.invalid("epochs must be ≥ 1, got \(epochs)") }
        guard batchSize >= 1 else { throw GraftError.invalid("batch size must be ≥ 1, got \(batchSize)") }
        guard gradientAccumulationSteps >= 1 else { throw GraftError.invalid("gradient accumulation steps must be ≥ 1, got \(gradientAccumulationSteps)") }
        guard learningRate > 0, learningRate.isFinite else { throw GraftError.invalid("learning rate must be positive, got \(learningRate)") }
        guard weightDecay >= 0 else { throw GraftError.invalid("weight decay must be ≥ 0, got \(weightDecay)") }
        guard warmupSteps >= 0 else { throw GraftError.invalid("warmup steps must be ≥ 0, got \(warmupSteps)") }
        if let c = maxGradNorm { guard c > 0 else { throw GraftError.invalid("max grad norm must be positive, got \(c)") } }
        guard evalBatchSize >= 1 else { throw GraftError.invalid("eval batch size must be ≥ 1, got \(evalBatchSize)") }
    }
}

/// What the progress callback sees after every optimizer step.
public struct TrainingProgress: Sendable {
    /// Optimizer steps taken (1-based after the first).
    public var step: Int
    /// Optimizer steps in the whole run.
    public var totalSteps: Int
    /// Current epoch (0-based).
    public var epoch: Int
    /// This step's training loss.
    public var loss: Float
    /// Mean training loss over the steps so far in this run.
    public var meanLoss: Float
    /// Learning rate used by this step.
    public var learningRate: Float
    /// Global gradient norm before clipping.
    public var gradNorm: Float
    /// Training tokens processed per second so far (real tokens only: there is no padding).
    public var tokensPerSecond: Double
    /// Seconds since training started.
    public var elapsed: Double
    /// Estimated seconds remaining.
    public var eta: Double
}

/// Loss, accuracy and perplexity over a dataset.
public struct EvaluationMetrics: Sendable {
    /// Mean loss per counted item (sequence or target token).
    public var loss: Double
    /// Fraction of items predicted correctly (class, or next token).
    public var accuracy: Double
    /// `exp(loss)`; meaningful for language modelling.
    public var perplexity: Double { exp(loss) }
    /// Items counted.
    public var count: Int
}

/// Trains one adapter: batching, optimizer, schedule, clipping, accumulation, evaluation, checkpoints.
public final class Trainer {
    /// The run's settings.
    public let config: TrainerConfig
    /// The model with the adapter being trained.
    public let model: AdaptedModel
    /// The adapter being trained (replaced by ``rebindAdapter()``).
    public private(set) var adapter: NamedAdapter
    /// The loss.
    public let objective: TrainingObjective
    /// The optimizer over the adapter's parameters.
    public private(set) var optimizer: Optimizer
    /// Optimizer steps taken so far (restored by ``loadCheckpoint(directory:)``).
    public internal(set) var globalStep = 0
    /// Micro-batches consumed so far (global micro-batches when data-parallel).
    public internal(set) var microStep = 0
    /// The processes training together (data parallelism, see ``DataParallel.swift``); one process by default.
    /// Each rank takes its `batchSize` slice of every global batch of `batchSize × size` examples, and the
    /// gradients are summed over the group before every optimizer step, so the run equals one process with the
    /// global batch. Set it before training starts.
    public var processGroup: any ProcessGroup = SingleProcessGroup()
    /// What identifies the model and its origin beyond the adapter's weights (e.g. the model file's path and
    /// size), compared across ranks with the options and data before data-parallel training.
    public var modelIdentity = RunFingerprint()
    /// Whether the ranks were found to start the same run (data-parallel only).
    var verifiedGroup = false
    /// Real tokens in the last global micro-batch (all ranks' shares), for throughput figures.
    var lastGlobalTokens = 0

    /// Sets up training of `adapterName` (made active) with `objective`.
    public init(model: AdaptedModel, adapterName: String, objective: TrainingObjective, config: TrainerConfig) throws {
        try config.validate()
        self.config = config
        self.model = model
        adapter = try model.adapter(adapterName)
        try model.setActiveAdapter(adapterName)
        self.objective = objective
        optimizer = Self.makeOptimizer(config, parameters: adapter.parameters)
        adapter.state.rng = GraftRNG(seed: config.seed &+ 0x5EED)
    }

    private static func makeOptimizer(_ config: TrainerConfig, parameters params: [Tensor]) -> Optimizer {
        switch config.optimizer {
        case .adamw:
            AdamW(parameters: params, learningRate: config.learningRate, beta1: config.beta1, beta2: config.beta2,
                  eps: config.eps, weightDecay: config.weightDecay)
        case .sgd:
            SGD(parameters: params, learningRate: config.learningRate, momentum: config.momentum, weightDecay: config.weightDecay)
        }
    }

    /// Takes the model's adapter of the same name again, with a fresh optimizer over its parameters and its
    /// gradients cleared: for an initialization that rebuilt it (EVA's ranks) or set it from data (LoRA-GA), before
    /// the first micro-batch. Throws once training has started.
    public func rebindAdapter() throws {
        guard microStep == 0 else {
            throw GraftError(.state, "adapter '\(adapter.name)' cannot be rebound after \(microStep) micro-batches of training")
        }
        adapter = try model.adapter(adapter.name)
        try model.setActiveAdapter(adapter.name)
        for p in adapter.parameters { p.grad = nil }
        optimizer = Self.makeOptimizer(config, parameters: adapter.parameters)
        adapter.state.rng = GraftRNG(seed: config.seed &+ 0x5EED)
    }

    /// Examples per global micro-batch: `batchSize` on each of the group's processes.
    public var globalBatchSize: Int { config.batchSize * processGroup.size }

    /// Global micro-batches per epoch for `count` examples.
    public func batchesPerEpoch(_ count: Int) -> Int { (count + globalBatchSize - 1) / globalBatchSize }

    /// Optimizer steps for a run over `count` examples.
    public func totalSteps(_ count: Int) -> Int {
        config.epochs * ((batchesPerEpoch(count) + config.gradientAccumulationSteps - 1) / config.gradientAccumulationSteps)
    }

    /// The example order of `epoch` (a seeded shuffle, so a resumed run sees the same order).
    public func order(epoch: Int, count: Int) -> [Int] {
        var indices = Array(0..<count)
        guard config.shuffle else { return indices }
        var rng = GraftRNG(seed: config.seed &+ UInt64(epoch) &* 0x9E37_79B9)
        for i in stride(from: count - 1, to: 0, by: -1) {
            let j = Int(rng.next() % UInt64(i + 1))
            indices.swapAt(i, j)
        }
        return indices
    }

    /// One micro-batch forward + backward, gradients scaled for accumulation; returns the loss (including the
    /// terms of the adapter's ``AdapterTrainingHook``s, e.g. router auxiliary losses).
    ///
    /// Data-parallel, `batch` is this rank's share of a global micro-batch, and the loss returned is the global
    /// batch's (see ``accumulateShare(_:)``).
    public func accumulate(_ batch: PackedBatch) throws -> Float {
        try accumulateShare(batch)
    }

    /// ``accumulate(_:)`` for this rank's share of a global micro-batch, which may be empty (nil) at the end of
    /// an epoch. With more than one process the loss is scaled by this share's counted items over the global
    /// batch's (one small allreduce), so that summing gradients over the ranks gives the gradient of the global
    /// batch's mean loss even when shares hold different numbers of sequences or targeted tokens.
    func accumulateShare(_ batch: PackedBatch?) throws -> Float {
        if processGroup.size > 1 && !verifiedGroup { try verifyGroup(data: nil, maxSteps: nil) }
        model.setTraining(true)
        defer { model.setTraining(false) }
        var loss: Tensor?
        if let batch {
            try applyTaskIDs(batch)
            var l = try objective.loss(batch)
            for hook in adapter.trainingHooks {
                if let penalty = hook.regularization() { l = l + penalty }
            }
            loss = l
        }
        var share: Float = 1
        var reported = loss?.item ?? 0
        lastGlobalTokens = batch?.realTokenCount ?? 0
        if processGroup.size > 1 {
            let local = Double(batch.map { objective.countedItems($0) } ?? 0)
            var sums = [local, local * Double(reported), Double(lastGlobalTokens)]
            try processGroup.allreduceSum(&sums)
            share = sums[0] > 0 ? Float(local / sums[0]) : 0
            reported = sums[0] > 0 ? Float(sums[1] / sums[0]) : 0
            lastGlobalTokens = Int(sums[2])
        }
        if let loss {
            let factor = share / Float(config.gradientAccumulationSteps)
            let scaled = factor == 1 ? loss : loss * factor
            scaled.backward()
        }
        // Layers that learn from gradients beyond the optimizer (RoSA's mask) see them before the step.
        adapter.afterBackward(step: globalStep)
        microStep += 1
        return reported
    }

    /// Whether the last batch set per-example task ids on the model.
    var taskIDsSet = false

    /// Routes task-routed adapters (Poly / MHR) by the batch's per-sequence task ids; clears ids this trainer
    /// set before when the batch carries none.
    func applyTaskIDs(_ batch: PackedBatch) throws {
        if !batch.taskIDs.isEmpty {
            guard !batch.isPacked || batch.sequenceCount == 1 || Set(batch.taskIDs).count == 1 else {
                throw GraftError.invalid("per-example task ids need one row per sequence (a padded batch); this batch packs \(batch.sequenceCount) sequences of \(Set(batch.taskIDs).count) tasks")
            }
            try model.setTaskIDs(batch.isPacked ? [Int(batch.taskIDs[0])] : batch.taskIDs.map(Int.init))
            taskIDsSet = true
        } else if taskIDsSet {
            try model.setTaskIDs(nil)
            taskIDsSet = false
        }
    }

    /// Sums the gradients over the process group (data-parallel), then clips, updates and clears them with the
    /// scheduled learning rate; returns (lr, grad norm of the summed gradient).
    @discardableResult
    public func optimizerStep(totalSteps: Int) throws -> (learningRate: Float, gradNorm: Float) {
        try GradientAllreduce.sum(optimizer.parameters, group: processGroup)
        let schedule = LearningRateSchedule(kind: config.schedule, warmupSteps: config.warmupSteps, totalSteps: totalSteps)
        let lr = config.learningRate * schedule.multiplier(at: globalStep)
        optimizer.learningRate = lr
        let norm = clipGradientNorm(optimizer.parameters, maxNorm: config.maxGradNorm)
        optimizer.step()
        globalStep += 1
        for hook in adapter.trainingHooks {
            hook.didUpdate(step: globalStep, totalSteps: totalSteps)
            let reset = hook.takeParametersToReset()
            if !reset.isEmpty { optimizer.resetState(of: reset) }
        }
        optimizer.zeroGrad()
        return (lr, norm)
    }

    /// One full optimizer step on one batch (no accumulation); returns the loss. For drivers that batch themselves.
    public func step(_ batch: PackedBatch, totalSteps: Int) throws -> Float {
        let loss = try accumulate(batch)
        try optimizerStep(totalSteps: totalSteps)
        return loss
    }

    /// Trains over `data` for `config.epochs`, continuing from a restored checkpoint if one was loaded.
    ///
    /// `progress` runs after every optimizer step; returning false stops training early (the trainer stays
    /// consistent and can be checkpointed). `maxSteps` is a step budget that overrides `config.epochs`, as
    /// transformers' `max_steps` does: the run takes that many optimizer steps in all, passing over the data as
    /// often as that needs, and the schedule spans them. Returns the mean training loss of the steps run.
    @discardableResult
    public func train(_ data: [TokenizedExample], maxSteps: Int? = nil,
                      progress: (TrainingProgress) -> Bool = { _ in true }) throws -> Float {
        guard !data.isEmpty else { throw GraftError.invalid("the training set is empty") }
        if let maxSteps, maxSteps < 1 { throw GraftError.invalid("max steps must be ≥ 1, got \(maxSteps)") }
        let total = maxSteps ?? totalSteps(data.count)
        let perEpoch = batchesPerEpoch(data.count)
        let microSteps = maxSteps == nil ? config.epochs * perEpoch : Int.max
        let start = Date()
        var tokens = 0
        var lossSum: Double = 0, lossCount = 0
        var windowLoss: Double = 0, windowCount = 0
        let startStep = globalStep
        if processGroup.size > 1 { try verifyGroup(data: data, maxSteps: maxSteps) }
        while microStep < microSteps && globalStep < total {
            let epoch = microStep / perEpoch
            let b = microStep % perEpoch
            let indices = order(epoch: epoch, count: data.count)
            let slice = shareOfBatch(b, of: indices)
            let batch = slice.isEmpty ? nil : try PackedBatch(ArraySlice(slice.map { data[$0] }), padded: model.needsPaddedBatches)
            let loss = try accumulateShare(batch)
            tokens += lastGlobalTokens
            windowLoss += Double(loss)
            windowCount += 1
            let endOfEpoch = microStep % perEpoch == 0
            if (b + 1) % config.gradientAccumulationSteps == 0 || endOfEpoch {
                let (lr, norm) = try optimizerStep(totalSteps: total)
                let stepLoss = Float(windowLoss / Double(max(windowCount, 1)))
                windowLoss = 0
                windowCount = 0
                lossSum += Double(stepLoss)
                lossCount += 1
                let elapsed = Date().timeIntervalSince(start)
                let done = globalStep - startStep
                let remaining = total - globalStep
                let info = TrainingProgress(
                    step: globalStep, totalSteps: total, epoch: epoch, loss: stepLoss,
                    meanLoss: Float(lossSum / Double(lossCount)), learningRate: lr, gradNorm: norm,
                    tokensPerSecond: elapsed > 0 ? Double(tokens) / elapsed : 0, elapsed: elapsed,
                    eta: done > 0 ? elapsed / Double(done) * Double(remaining) : 0)
                if !progress(info) { break }
            }
        }
        return Float(lossSum / Double(max(lossCount, 1)))
    }

    /// Loss and accuracy over `data`, without recording.
    public func evaluate(_ data: [TokenizedExample]) throws -> EvaluationMetrics {
        guard !data.isEmpty else { throw GraftError.invalid("the evaluation set is empty") }
        var lossSum: Double = 0, correct = 0, count = 0
        var i = 0
        while i < data.count {
            let batch = try PackedBatch(data[i..<min(data.count, i + config.evalBatchSize)], padded: model.needsPaddedBatches)
            try applyTaskIDs(batch)
            let r = try objective.evaluate(batch)
            lossSum += r.lossSum
            correct += r.correct
            count += r.count
            i += config.evalBatchSize
        }
        return EvaluationMetrics(loss: lossSum / Double(max(count, 1)), accuracy: Double(correct) / Double(max(count, 1)), count: count)
    }
}
