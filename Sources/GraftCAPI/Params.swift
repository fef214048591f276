// The C ABI's parameter structs, laid out by include/graft.h itself (imported as CGraftABI), read with the
// struct_size rules of the header's VERSIONING section and translated to and from Graft's typed options, whose
// defaults and checks are the only ones.
import CGraftABI
import Graft

/// The caller's parameter struct read over `defaults`: fields beyond its struct_size keep their defaults; a
/// larger struct_size (a newer header) is accepted when the bytes this library does not know are all zero.
func readParams<T>(_ p: UnsafePointer<T>?, defaults: T, name: String) throws -> T {
    var value = defaults
    guard let p else { return value }
    let raw = UnsafeRawPointer(p)
    let declared = Int(raw.loadUnaligned(as: UInt32.self))
    let known = MemoryLayout<T>.size
    guard declared >= Int(GRAFT_PARAMS_MIN_SIZE) else {
        throw invalid("\(name).struct_size is \(declared); it must be at least \(GRAFT_PARAMS_MIN_SIZE) (fill the struct with \(name)_init)")
    }
    guard declared <= 4096 else { throw invalid("\(name).struct_size is \(declared), which is implausibly large (fill the struct with \(name)_init)") }
    if declared > known {
        for i in known..<declared where raw.load(fromByteOffset: i, as: UInt8.self) != 0 {
            throw invalid("\(name).struct_size is \(declared) but this library (\(GraftVersion.string)) knows \(known) bytes, and byte \(i) of the unknown tail is not zero (a field of a newer graft.h is set)")
        }
    }
    withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(start: raw, count: min(declared, known))) }
    return value
}

/// Fills the caller's first `size` bytes with `defaults` (bytes this library does not know are zeroed) and sets
/// struct_size = size. NULL or a size below GRAFT_PARAMS_MIN_SIZE is ignored.
func initParams<T>(_ p: UnsafeMutablePointer<T>?, size: Int, defaults: T) {
    guard let p, size >= Int(GRAFT_PARAMS_MIN_SIZE) else { return }
    let raw = UnsafeMutableRawPointer(p)
    raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
    withUnsafeBytes(of: defaults) { bytes in
        if let base = bytes.baseAddress { raw.copyMemory(from: base, byteCount: min(size, bytes.count)) }
    }
    raw.storeBytes(of: UInt32(truncatingIfNeeded: size), as: UInt32.self)
}

/// A C enum value from its Swift counterpart's numbering table.
private func cValue<E: Equatable>(_ value: E, in table: [(E, UInt32)]) -> Int32 {
    Int32(table.first { $0.0 == value }?.1 ?? 0)
}

/// The Swift value of a C enum field, or an error naming the field and the values it takes.
private func swiftValue<E>(_ raw: Int32, in table: [(E, UInt32)], field: String, names: String) throws -> E {
    guard raw >= 0, let match = table.first(where: { $0.1 == UInt32(raw) }) else {
        throw invalid("\(field) is \(raw); expected \(names)")
    }
    return match.0
}

/// graft_task ↔ SessionTask.
let taskTable: [(SessionTask, UInt32)] = [
    (.base, GRAFT_TASK_BASE.rawValue), (.sequenceClassification, GRAFT_TASK_SEQUENCE_CLASSIFICATION.rawValue),
    (.causalLM, GRAFT_TASK_CAUSAL_LM.rawValue),
]
/// graft_schedule ↔ TrainingOptions.Schedule.
let scheduleTable: [(TrainingOptions.Schedule, UInt32)] = [
    (.constant, GRAFT_SCHEDULE_CONSTANT.rawValue), (.linear, GRAFT_SCHEDULE_LINEAR.rawValue),
    (.cosine, GRAFT_SCHEDULE_COSINE.rawValue),
]
/// graft_compute_dtype ↔ ComputeDType.
let computeTable: [(ComputeDType, UInt32)] = [
    (.float32, GRAFT_COMPUTE_FLOAT32.rawValue), (.bfloat16, GRAFT_COMPUTE_BFLOAT16.rawValue),
    (.auto, GRAFT_COMPUTE_AUTO.rawValue),
]
/// graft_optimizer ↔ TrainerConfig.OptimizerKind.
let optimizerTable: [(TrainerConfig.OptimizerKind, UInt32)] = [
    (.adamw, GRAFT_OPTIMIZER_ADAMW.rawValue), (.sgd, GRAFT_OPTIMIZER_SGD.rawValue),
]

extension graft_model_params {
    /// The C struct holding `o`.
    init(_ o: ModelOptions) {
        self.init()
        struct_size = UInt32(MemoryLayout<Self>.size)
        num_threads = Int32(clamping: o.numThreads)
        task = cValue(o.task, in: taskTable)
        num_labels = Int32(clamping: o.numLabels)
        seed = o.seed
        compute_dtype = cValue(o.computeDType, in: computeTable)
    }

    /// The typed options, validated.
    func options() throws -> ModelOptions {
        var o = ModelOptions()
        o.numThreads = Int(num_threads)
        o.task = try swiftValue(task, in: taskTable, field: "graft_model_params.task",
                                names: "GRAFT_TASK_BASE (0), GRAFT_TASK_SEQUENCE_CLASSIFICATION (1) or GRAFT_TASK_CAUSAL_LM (2)")
        o.numLabels = Int(num_labels)
        o.seed = seed
        o.computeDType = try swiftValue(compute_dtype, in: computeTable, field: "graft_model_params.compute_dtype",
                                        names: "GRAFT_COMPUTE_FLOAT32 (0), GRAFT_COMPUTE_BFLOAT16 (1) or GRAFT_COMPUTE_AUTO (2)")
        if let moe_base {
            guard let text = String(validatingCString: moe_base) else { throw invalid("graft_model_params.moe_base is not valid UTF-8") }
            o.moeBase = text
        }
        try prefixed("graft_model_params") { try o.validate() }
        return o
    }
}

extension graft_sampling_params {
    /// The C struct holding `o`.
    init(_ o: SamplingOptions) {
        self.init()
        struct_size = UInt32(MemoryLayout<Self>.size)
        max_new_tokens = Int32(clamping: o.maxNewTokens)
        temperature = o.temperature
        top_p = o.topP
        top_k = Int32(clamping: o.topK)
        stop_at_eos = o.stopAtEOS ? 1 : 0
        seed = o.seed
        fast_decode = o.fastDecode ? 1 : 0
    }

    /// The typed options, validated.
    func options() throws -> SamplingOptions {
        var o = SamplingOptions()
        o.maxNewTokens = Int(max_new_tokens)
        o.temperature = temperature
        o.topP = top_p
        o.topK = Int(top_k)
        o.stopAtEOS = stop_at_eos != 0
        o.seed = seed
        o.fastDecode = fast_decode != 0
        try prefixed("graft_sampling_params") { try o.validate() }
        return o
    }
}

extension graft_trainer_params {
    /// The C struct holding `o`'s fields (the rest travel in extras_json).
    init(_ o: TrainingOptions) {
        self.init()
        struct_size = UInt32(MemoryLayout<Self>.size)
        learning_rate = o.learningRate
        weight_decay = o.weightDecay
        warmup_steps = Int32(clamping: o.warmupSteps)
        total_steps = Int32(clamping: o.totalSteps)
        schedule = cValue(o.schedule, in: scheduleTable)
        optimizer = cValue(o.optimizer, in: optimizerTable)
        max_grad_norm = o.maxGradNorm
        gradient_accumulation_steps = Int32(clamping: o.gradientAccumulationSteps)
        batch_size = Int32(clamping: o.batchSize)
        seed = o.seed
        epochs = Int32(clamping: o.epochs)
        max_length = Int32(clamping: o.maxLength)
    }

    /// The typed options: these fields, then `extras` (a JSON object of ``TrainingOptions/extrasKeys``), validated.
    func options(extras: String?) throws -> TrainingOptions {
        var o = TrainingOptions()
        o.learningRate = learning_rate
        o.weightDecay = weight_decay
        o.warmupSteps = Int(warmup_steps)
        o.totalSteps = Int(total_steps)
        o.schedule = try swiftValue(schedule, in: scheduleTable, field: "graft_trainer_params.schedule",
                                    names: "GRAFT_SCHEDULE_CONSTANT (0), _LINEAR (1) or _COSINE (2)")
        o.optimizer = try swiftValue(optimizer, in: optimizerTable, field: "graft_trainer_params.optimizer",
                                     names: "GRAFT_OPTIMIZER_ADAMW (0) or GRAFT_OPTIMIZER_SGD (1)")
        o.maxGradNorm = max_grad_norm
        o.gradientAccumulationSteps = Int(gradient_accumulation_steps)
        o.batchSize = Int(batch_size)
        o.seed = seed
        o.epochs = Int(epochs)
        o.maxLength = Int(max_length)
        if let extras { try o.update(json: extras, allowed: TrainingOptions.extrasKeys, source: "extras_json") }
        do {
            try o.validate()
        } catch let e as GraftError {
            // Messages start with the field's name; extras fields came from extras_json.
            let field = String(e.message.prefix { $0 != " " })
            let owner = TrainingOptions.extrasKeys.contains(field) ? "extras_json" : "graft_trainer_params"
            throw GraftError(e.code, "\(owner).\(e.message)")
        }
        return o
    }
}

/// Runs `body`, prefixing a thrown GraftError's message with `name: ` (the struct the field belongs to).
private func prefixed(_ name: String, _ body: () throws -> Void) throws {
    do { try body() } catch let e as GraftError { throw GraftError(e.code, "\(name).\(e.message)") }
}
