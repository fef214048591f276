import Foundation
import GraftTrain

/// How a training run goes: the one definition of these options, their defaults, their meaning and their checks.
/// The C ABI's `graft_trainer_params` + `extras_json`, graftd's `TrainingConfig`, the CLI's flags and
/// `--config` file, and the bindings all translate into it.
///
/// Semantics, identical at every door: `maxGradNorm` 0 means no clipping; `totalSteps` 0 means `epochs` passes
/// over the data, and a positive value is a step budget that overrides `epochs` (as transformers' `max_steps`)
/// and that the schedule spans; the schedule decays after `warmupSteps` of linear warm-up.
public struct TrainingOptions: Sendable, Equatable {
    /// Learning-rate schedule after warm-up.
    public enum Schedule: String, Sendable, CaseIterable, Codable {
        /// Constant.
        case constant
        /// Linear decay to 0 at the last step.
        case linear
        /// Half-cosine decay to 0 at the last step.
        case cosine
    }

    /// Peak learning rate (> 0). Default 1e-3.
    public var learningRate: Float = 1e-3
    /// AdamW's decoupled decay or SGD's L2 penalty (≥ 0). Default 0.01.
    public var weightDecay: Float = 0.01
    /// Steps of linear warm-up from 0 (≥ 0). Default 0.
    public var warmupSteps: Int = 0
    /// Optimizer steps to run; 0 = `epochs` passes over the data (≥ 0). Default 0.
    public var totalSteps: Int = 0
    /// The schedule after warm-up. Default linear.
    public var schedule: Schedule = .linear
    /// The optimizer. Default AdamW.
    public var optimizer: TrainerConfig.OptimizerKind = .adamw
    /// Clip the global gradient norm to this; 0 = no clipping (≥ 0). Default 1.
    public var maxGradNorm: Float = 1
    /// Micro-batches whose gradients are averaged into one optimizer step (≥ 1). Default 1.
    public var gradientAccumulationSteps: Int = 1
    /// Sequences per micro-batch (≥ 1). Default 32.
    public var batchSize: Int = 32
    /// Seed of shuffling and dropout. Default 42.
    public var seed: UInt64 = 42
    /// Passes over the data when `totalSteps` is 0 (≥ 1). Default 1.
    public var epochs: Int = 1
    /// Longest example in tokens; longer ones are truncated (≥ 3). Default 64.
    public var maxLength: Int = 64
    /// AdamW's first and second moment decay, in [0, 1). Defaults 0.9, 0.999.
    public var beta1: Float = 0.9, beta2: Float = 0.999
    /// AdamW's epsilon (> 0). Default 1e-8.
    public var eps: Float = 1e-8
    /// SGD's momentum, in [0, 1). Default 0.9.
    public var momentum: Float = 0.9
    /// Shuffle the training data every epoch. Default true.
    public var shuffle: Bool = true
    /// Sequences per evaluation batch (≥ 1). Default 64.
    public var evalBatchSize: Int = 64
    /// Use at most this many training examples, spread evenly over the data (nil = all, else ≥ 1).
    public var maxExamples: Int? = nil
    /// Training batches an adapter added with a data-driven initialization (`init_lora_weights` `"eva"`,
    /// `"lora_ga"`, `"corda"`) reads before the first step: the first ones of the first epoch (≥ 1). Default 8.
    /// PEFT's `EvaConfig` and `LoraGAConfig` have no such field (the caller's dataloader or train step decides).
    public var initBatches: Int = 8

    /// The defaults.
    public init() {}

    /// Throws naming the first field out of range (by its snake_case name, as every door spells it).
    public func validate() throws {
        func check(_ ok: Bool, _ message: @autoclosure () -> String) throws { if !ok { throw GraftError.invalid(message()) } }
        try check(learningRate > 0 && learningRate.isFinite, "learning_rate must be positive and finite, got \(learningRate)")
        try check(weightDecay >= 0 && weightDecay.isFinite, "weight_decay must be ≥ 0, got \(weightDecay)")
        try check(warmupSteps >= 0, "warmup_steps must be ≥ 0, got \(warmupSteps)")
        try check(totalSteps >= 0, "total_steps must be ≥ 0 (0 = epochs over the data), got \(totalSteps)")
        try check(maxGradNorm >= 0 && maxGradNorm.isFinite, "max_grad_norm must be ≥ 0 (0 = no clipping), got \(maxGradNorm)")
        try check(gradientAccumulationSteps >= 1, "gradient_accumulation_steps must be ≥ 1, got \(gradientAccumulationSteps)")
        try check(batchSize >= 1, "batch_size must be ≥ 1, got \(batchSize)")
        try check(epochs >= 1, "epochs must be ≥ 1, got \(epochs)")
        try check(maxLength >= 3, "max_length must be ≥ 3, got \(maxLength)")
        try check(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got \(beta1)")
        try check(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got \(beta2)")
        try check(eps > 0 && eps.isFinite, "eps must be positive, got \(eps)")
        try check(momentum >= 0 && momentum < 1, "momentum must be in [0, 1), got \(momentum)")
        try check(evalBatchSize >= 1, "eval_batch_size must be ≥ 1, got \(evalBatchSize)")
        if let maxExamples { try check(maxExamples >= 1, "max_examples must be ≥ 1, got \(maxExamples)") }
        try check(initBatches >= 1, "init_batches must be ≥ 1, got \(initBatches)")
    }

    /// The trainer's configuration (validated first).
    public func trainerConfig() throws -> TrainerConfig {
        try validate()
        var c = TrainerConfig()
        c.learningRate = learningRate
        c.weightDecay = weightDecay
        c.warmupSteps = warmupSteps
        c.schedule = switch schedule {
        case .constant: .constant
        case .linear: .linear
        case .cosine: .cosine
        }
        c.optimizer = optimizer
        c.maxGradNorm = maxGradNorm > 0 ? maxGradNorm : nil
        c.gradientAccumulationSteps = gradientAccumulationSteps
        c.batchSize = batchSize
        c.seed = seed
        c.epochs = epochs
        c.beta1 = beta1
        c.beta2 = beta2
        c.eps = eps
        c.momentum = momentum
        c.shuffle = shuffle
        c.evalBatchSize = evalBatchSize
        return c
    }
}
