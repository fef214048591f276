import ArgumentParser
import Foundation
import Graft

/// Shared training flags of `graft demo` and `graft train`: they set Graft's typed ``Graft/TrainingOptions``.
struct TrainingFlags: ParsableArguments {
    @Option(help: "Passes over the training data.") var epochs: Int?
    @Option(help: "Stop after this many optimizer steps, overriding --epochs (the schedule spans them).") var maxSteps: Int?
    @Option(help: "Sequences per batch.") var batchSize: Int?
    @Option(help: "Peak learning rate.") var lr: Float?
    @Option(help: "Weight decay.") var weightDecay: Float?
    @Option(help: "Warm-up steps.") var warmup: Int?
    @Option(help: "Schedule: constant, linear, cosine.") var schedule: String?
    @Option(help: "Clip the global gradient norm (0 = off).") var maxGradNorm: Float?
    @Option(help: "Gradient accumulation steps.") var accumulate: Int?
    @Option(help: "Random seed.") var seed: UInt64?
    @Option(help: "Threads (default: all cores).") var threads: Int?
    @Option(name: .customLong("compute-dtype"), help: "Number format of the frozen weights' products: float32 (exact, default), bfloat16 or auto.")
    var computeDType: String?
    @Option(help: "Save a checkpoint (adapter, optimizer, step) in this directory (rank 0 under mpirun).") var checkpointDir: String?
    @Option(help: "Steps between checkpoints (with --checkpoint-dir; default: only at the end).") var checkpointEvery: Int?
    @Flag(help: "Continue from the checkpoint in --checkpoint-dir when there is one (any rank count with the same ranks × batch size).")
    var resume = false
    @Flag(help: "After training, print what the adapter's training hooks decided (per-module ranks over time for IncreLoRA / TriAdaptLoRA).")
    var report = false
    @Flag(help: "Skip the evaluation before training (the 'before' line); the one after training still runs.")
    var skipInitialEval = false

    /// The checkpointing the flags ask for (nil: none).
    func checkpointPlan() throws -> TrainingRun.CheckpointPlan? {
        guard let checkpointDir else {
            if checkpointEvery != nil || resume { throw GraftError.invalid("--checkpoint-every and --resume need --checkpoint-dir") }
            return nil
        }
        if let every = checkpointEvery, every < 1 { throw GraftError.invalid("--checkpoint-every must be ≥ 1, got \(every)") }
        return .init(directory: checkpointDir, every: checkpointEvery ?? 0, resume: resume)
    }

    /// The compute format the flags ask for (default float32).
    func computeFormat() throws -> ComputeDType {
        guard let computeDType else { return .float32 }
        guard let d = ComputeDType(rawValue: computeDType) else {
            throw GraftError.invalid("--compute-dtype '\(computeDType)' is not one of float32, bfloat16, auto")
        }
        return d
    }

    func apply(to o: inout Graft.TrainingOptions) throws {
        if let maxSteps {
            guard maxSteps >= 1 else { throw GraftError.invalid("--max-steps must be ≥ 1, got \(maxSteps)") }
            o.totalSteps = maxSteps
        }
        if let epochs { o.epochs = epochs }
        if let batchSize { o.batchSize = batchSize }
        if let lr { o.learningRate = lr }
        if let weightDecay { o.weightDecay = weightDecay }
        if let warmup { o.warmupSteps = warmup }
        if let schedule {
            guard let kind = Graft.TrainingOptions.Schedule(rawValue: schedule) else {
                throw GraftError.invalid("--schedule '\(schedule)' is not one of constant, linear, cosine")
            }
            o.schedule = kind
        }
        if let maxGradNorm { o.maxGradNorm = maxGradNorm }
        if let accumulate { o.gradientAccumulationSteps = accumulate }
        if let seed { o.seed = seed }
        if let threads { Threading.setThreads(threads) }
    }
}
