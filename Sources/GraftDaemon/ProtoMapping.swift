import Foundation
import Graft

/// Wire messages translated into the engine's types.
extension Engine {
    /// The training options a `start_training` asks for: unset fields keep the options' defaults, set fields
    /// mean what graft_trainer_params' fields mean; throws naming the field at fault.
    static func trainingOptions(_ c: Graft_V1_TrainingConfig) throws -> TrainingOptions {
        var o = TrainingOptions()
        if c.learningRateSet != nil { o.learningRate = c.learningRate }
        if c.weightDecaySet != nil { o.weightDecay = c.weightDecay }
        o.warmupSteps = Int(c.warmupSteps)
        o.totalSteps = Int(c.totalSteps)
        // The one table between graft.proto's numbering and the options' (graft.h numbers them otherwise).
        switch c.schedule {
        case .linear: o.schedule = .linear
        case .constant: o.schedule = .constant
        case .cosine: o.schedule = .cosine
        case .UNRECOGNIZED(let v): throw GraftError.invalid("start_training.config.schedule \(v) is not a Schedule value (0, 1, 2)")
        }
        switch c.optimizer {
        case .adamw: o.optimizer = .adamw
        case .sgd: o.optimizer = .sgd
        case .UNRECOGNIZED(let v): throw GraftError.invalid("start_training.config.optimizer \(v) is not an Optimizer value (0, 1)")
        }
        if c.maxGradNormSet != nil { o.maxGradNorm = c.maxGradNorm }
        if c.gradientAccumulationStepsSet != nil { o.gradientAccumulationSteps = Int(c.gradientAccumulationSteps) }
        if c.batchSizeSet != nil { o.batchSize = Int(c.batchSize) }
        if c.seedSet != nil { o.seed = c.seed }
        if c.epochsSet != nil { o.epochs = Int(c.epochs) }
        if c.maxLengthSet != nil { o.maxLength = Int(c.maxLength) }
        if !c.extrasJson.isEmpty {
            try o.update(json: c.extrasJson, allowed: TrainingOptions.extrasKeys, source: "start_training.config.extras_json")
        }
        do {
            try o.validate()
        } catch let e as GraftError {
            throw GraftError(e.code, "start_training.config.\(e.message)")
        }
        return o
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

    /// The compute format a `load_model` asks for.
    static func computeDType(_ value: Graft_V1_ComputeDType) throws -> ComputeDType {
        switch value {
        case .computeFloat32: return .float32
        case .computeBfloat16: return .bfloat16
        case .computeAuto: return .auto
        case .UNRECOGNIZED(let v): throw GraftError.invalid("load_model.compute_dtype \(v) is not a ComputeDType value (0, 1, 2)")
        }
    }

    /// The output a `forward` asks for; nil (OUTPUT_DEFAULT) leaves the choice to ``ForwardOptions``.
    static func sessionOutput(_ output: Graft_V1_Output) throws -> SessionOutput? {
        switch output {
        case .default: return nil
        case .hidden: return .hidden
        case .logits: return .logits
        case .UNRECOGNIZED(let v): throw GraftError.invalid("forward.output \(v) is not an Output value (0, 1, 2)")
        }
    }

    /// The sampling options of a `generate`: unset fields keep the options' defaults; throws naming the field at
    /// fault.
    static func samplingOptions(_ r: Graft_V1_Generate) throws -> SamplingOptions {
        var o = SamplingOptions()
        if r.maxNewTokensSet != nil { o.maxNewTokens = Int(r.maxNewTokens) }
        o.temperature = r.temperature
        if r.topPSet != nil { o.topP = r.topP }
        o.topK = Int(r.topK)
        o.stopAtEOS = !r.ignoreEos
        o.seed = r.seed
        o.fastDecode = r.fastDecode
        do {
            try o.validate()
        } catch let e as GraftError {
            throw GraftError(e.code, "generate.\(e.message)")
        }
        return o
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
