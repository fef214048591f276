import Foundation
import Graft

/// Wire messages translated into the engine's types.
extension Engine {
    /// The training configuration, step budget and maximum sequence length a `start_training` asks for, with
    /// the wire's defaults for zero fields; throws naming the field at fault.
    static func trainerConfig(_ c: Graft_V1_TrainingConfig) throws -> (TrainerConfig, totalSteps: Int, maxLength: Int) {
        var config = TrainerConfig()
        if c.learningRate != 0 { config.learningRate = c.learningRate }
        config.weightDecay = c.weightDecay
        config.warmupSteps = Int(c.warmupSteps)
        switch c.schedule {
        case .linear: config.schedule = .linear
        case .constant: config.schedule = .constant
        case .cosine: config.schedule = .cosine
        case .UNRECOGNIZED(let v): throw GraftError.invalid("config.schedule \(v) is not a Schedule value (0, 1, 2)")
        }
        switch c.optimizer {
        case .adamw: config.optimizer = .adamw
        case .sgd: config.optimizer = .sgd
        case .UNRECOGNIZED(let v): throw GraftError.invalid("config.optimizer \(v) is not an Optimizer value (0, 1)")
        }
        guard !c.maxGradNorm.isNaN else { throw GraftError.invalid("config.max_grad_norm is NaN") }
        config.maxGradNorm = c.maxGradNorm == 0 ? 1 : (c.maxGradNorm < 0 ? nil : c.maxGradNorm)
        if c.gradientAccumulationSteps != 0 { config.gradientAccumulationSteps = Int(c.gradientAccumulationSteps) }
        if c.batchSize != 0 { config.batchSize = Int(c.batchSize) }
        config.seed = c.seed
        if c.epochs != 0 { config.epochs = Int(c.epochs) }
        do {
            try config.validate()
        } catch let e as GraftError {
            throw GraftError(e.code, "start_training.config: \(e.message)")
        }
        return (config, Int(c.totalSteps), c.maxLength == 0 ? 64 : Int(c.maxLength))
    }

    /// The session task a `load_model` asks for.
    static func sessionTask(_ task: Graft_V1_Task) throws -> SessionTask {
        switch task {
        case .base: return .base
        case .sequenceClassification: return .sequenceClassification
        case .causalLm: return .causalLM
        case .UNRECOGNIZED(let v): throw GraftError.invalid("load_model.task \(v) is not a Task value (0, 1, 2)")
        }
    }

    /// The output a `forward` asks for; the default is logits when `s` has a head (classifier or LM), else
    /// hidden states.
    static func sessionOutput(_ output: Graft_V1_Output, for s: GraftSession) throws -> SessionOutput {
        switch output {
        case .default: return (s.classifier != nil || s.model.llama != nil) ? .logits : .hidden
        case .hidden: return .hidden
        case .logits: return .logits
        case .UNRECOGNIZED(let v): throw GraftError.invalid("forward.output \(v) is not an Output value (0, 1, 2)")
        }
    }

    /// The sampling parameters of a `generate`, with the wire's defaults for zero fields; throws naming the
    /// field at fault.
    static func generationParameters(_ r: Graft_V1_Generate) throws -> GenerationParameters {
        guard r.temperature >= 0, r.temperature.isFinite else {
            throw GraftError.invalid("generate.temperature must be ≥ 0, got \(r.temperature)")
        }
        guard r.topP >= 0, r.topP <= 1 else { throw GraftError.invalid("generate.top_p must be in (0, 1], got \(r.topP)") }
        guard r.maxNewTokens <= 1 << 20 else {
            throw GraftError.invalid("generate.max_new_tokens \(r.maxNewTokens) is above the limit of 1048576")
        }
        return GenerationParameters(maxNewTokens: r.maxNewTokens == 0 ? 128 : Int(r.maxNewTokens),
                                    temperature: r.temperature, topP: r.topP == 0 ? 1 : r.topP,
                                    topK: Int(r.topK), seed: r.seed)
    }

    /// A trainer's progress report as job `jobID`'s wire event.
    static func trainingEvent(jobID: String, _ p: TrainingProgress) -> Graft_V1_TrainingEvent {
        var e = Graft_V1_TrainingEvent()
        e.jobID = jobID
        e.step = UInt32(p.step)
        e.totalSteps = UInt32(p.totalSteps)
        e.epoch = UInt32(p.epoch)
        e.loss = p.loss
        e.meanLoss = p.meanLoss
        e.learningRate = p.learningRate
        e.gradNorm = p.gradNorm
        e.tokensPerSecond = p.tokensPerSecond
        e.elapsedSeconds = p.elapsed
        e.etaSeconds = p.eta
        return e
    }

    /// Evaluation metrics as their wire message.
    static func evalMetrics(_ m: EvaluationMetrics) -> Graft_V1_EvalMetrics {
        .with {
            $0.loss = m.loss
            $0.accuracy = m.accuracy
            $0.perplexity = m.perplexity
            $0.count = UInt32(m.count)
        }
    }
}
