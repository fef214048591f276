import Foundation
import GraftIO
import GraftTrain

extension TrainingOptions {
    /// The JSON keys of every option (snake_case, as graft.h, graft.proto and PEFT/transformers spell them).
    public static let jsonKeys: [String] = Patch.CodingKeys.allCases.map(\.rawValue)
    /// The keys `graft_trainer_create`'s `extras_json` and graftd's `extras_json` take (the rest are fields).
    public static let extrasKeys: Set<String> = ["beta1", "beta2", "eps", "momentum", "shuffle", "eval_batch_size", "max_examples", "init_batches"]

    /// Sets the options a JSON object names, leaving the others as they are. `allowed` limits the keys
    /// (nil = every key of ``jsonKeys``); an unknown key, a value of the wrong type (a number where a bool is
    /// expected, or the other way round) or a malformed document is an error naming `source` and the key.
    public mutating func update(json text: String, allowed: Set<String>? = nil, source: String) throws {
        let data = Data(text.utf8)
        let object = try parseJSONObject(text, source: source)
        let known = allowed ?? Set(Self.jsonKeys)
        for key in object.keys.sorted() where !known.contains(key) {
            throw GraftError.invalid("\(source): unknown key '\(key)' (known: \(known.sorted().joined(separator: ", ")))")
        }
        // Integers first: a fractional number for an integer is named here (the decoder does not say where).
        for key in object.keys.sorted() where Self.integerKeys.contains(key) {
            guard let value = object[key], !(value is NSNull) else { continue }
            if JSONScalar.integer(value) == nil {
                throw GraftError.invalid("\(source): '\(key)' must be an integer, got \(JSONScalar.describe(value))")
            }
        }
        let patch: Patch
        do {
            patch = try JSONDecoder().decode(Patch.self, from: data)
        } catch let DecodingError.typeMismatch(type, context), let DecodingError.valueNotFound(type, context) {
            let key = context.codingPath.first?.stringValue ?? "?"
            throw GraftError.invalid("\(source): '\(key)' must be \(Self.describe(type)), got \(JSONScalar.describe(object[key]))")
        } catch let DecodingError.dataCorrupted(context) {
            let key = context.codingPath.first?.stringValue ?? "?"
            let expected = Self.integerKeys.contains(key) ? "must be an integer" : "is invalid (\(context.debugDescription))"
            throw GraftError.invalid("\(source): '\(key)' \(expected), got \(JSONScalar.describe(object[key]))")
        }
        patch.apply(to: &self)
    }

    /// Every option as one JSON object with sorted keys (the names of ``jsonKeys``; `max_examples` null for all):
    /// what graft_trainer_options, graftd's JobStarted and `graft train` report, so doors can be compared.
    public var json: String {
        let object: [String: Any] = [
            "learning_rate": Double(learningRate), "weight_decay": Double(weightDecay), "warmup_steps": warmupSteps,
            "total_steps": totalSteps, "schedule": schedule.rawValue, "optimizer": optimizer.rawValue,
            "max_grad_norm": Double(maxGradNorm), "gradient_accumulation_steps": gradientAccumulationSteps,
            "batch_size": batchSize, "seed": seed, "epochs": epochs, "max_length": maxLength,
            "beta1": Double(beta1), "beta2": Double(beta2), "eps": Double(eps), "momentum": Double(momentum),
            "shuffle": shuffle, "eval_batch_size": evalBatchSize, "max_examples": maxExamples.map { $0 as Any } ?? NSNull(),
            "init_batches": initBatches,
        ]
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    private static let integerKeys: Set<String> = [
        "warmup_steps", "total_steps", "gradient_accumulation_steps", "batch_size", "seed", "epochs", "max_length",
        "eval_batch_size", "max_examples", "init_batches",
    ]

    private static func describe(_ type: Any.Type) -> String {
        switch type {
        case is Bool.Type: return "true or false"
        case is Int.Type, is UInt64.Type: return "an integer"
        case is Float.Type: return "a number"
        default: return "a string naming one of the choices"
        }
    }

    /// Every option as optional: what one JSON object sets.
    struct Patch: Decodable {
        enum CodingKeys: String, CodingKey, CaseIterable {
            case learningRate = "learning_rate", weightDecay = "weight_decay", warmupSteps = "warmup_steps"
            case totalSteps = "total_steps", schedule, optimizer, maxGradNorm = "max_grad_norm"
            case gradientAccumulationSteps = "gradient_accumulation_steps", batchSize = "batch_size", seed, epochs
            case maxLength = "max_length", beta1, beta2, eps, momentum, shuffle, evalBatchSize = "eval_batch_size"
            case maxExamples = "max_examples", initBatches = "init_batches"
        }
        var learningRate, weightDecay, maxGradNorm, beta1, beta2, eps, momentum: Float?
        var warmupSteps, totalSteps, gradientAccumulationSteps, batchSize, epochs, maxLength, evalBatchSize, maxExamples, initBatches: Int?
        var schedule: Schedule?
        var optimizer: TrainerConfig.OptimizerKind?
        var seed: UInt64?
        var shuffle: Bool?

        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            learningRate = try c.decodeIfPresent(Float.self, forKey: .learningRate)
            weightDecay = try c.decodeIfPresent(Float.self, forKey: .weightDecay)
            warmupSteps = try c.decodeIfPresent(Int.self, forKey: .warmupSteps)
            totalSteps = try c.decodeIfPresent(Int.self, forKey: .totalSteps)
            schedule = try c.decodeIfPresent(Schedule.self, forKey: .schedule)
            if let name = try c.decodeIfPresent(String.self, forKey: .optimizer) {
                guard let kind = TrainerConfig.OptimizerKind(rawValue: name.lowercased()) else {
                    throw DecodingError.dataCorruptedError(forKey: .optimizer, in: c, debugDescription: "expected adamw or sgd, got '\(name)'")
                }
                optimizer = kind
            }
            maxGradNorm = try c.decodeIfPresent(Float.self, forKey: .maxGradNorm)
            gradientAccumulationSteps = try c.decodeIfPresent(Int.self, forKey: .gradientAccumulationSteps)
            batchSize = try c.decodeIfPresent(Int.self, forKey: .batchSize)
            seed = try c.decodeIfPresent(UInt64.self, forKey: .seed)
            epochs = try c.decodeIfPresent(Int.self, forKey: .epochs)
            maxLength = try c.decodeIfPresent(Int.self, forKey: .maxLength)
            beta1 = try c.decodeIfPresent(Float.self, forKey: .beta1)
            beta2 = try c.decodeIfPresent(Float.self, forKey: .beta2)
            eps = try c.decodeIfPresent(Float.self, forKey: .eps)
            momentum = try c.decodeIfPresent(Float.self, forKey: .momentum)
            shuffle = try c.decodeIfPresent(Bool.self, forKey: .shuffle)
            evalBatchSize = try c.decodeIfPresent(Int.self, forKey: .evalBatchSize)
            maxExamples = try c.decodeIfPresent(Int.self, forKey: .maxExamples)
            initBatches = try c.decodeIfPresent(Int.self, forKey: .initBatches)
        }

        func apply(to o: inout TrainingOptions) {
            if let learningRate { o.learningRate = learningRate }
            if let weightDecay { o.weightDecay = weightDecay }
            if let warmupSteps { o.warmupSteps = warmupSteps }
            if let totalSteps { o.totalSteps = totalSteps }
            if let schedule { o.schedule = schedule }
            if let optimizer { o.optimizer = optimizer }
            if let maxGradNorm { o.maxGradNorm = maxGradNorm }
            if let gradientAccumulationSteps { o.gradientAccumulationSteps = gradientAccumulationSteps }
            if let batchSize { o.batchSize = batchSize }
            if let seed { o.seed = seed }
            if let epochs { o.epochs = epochs }
            if let maxLength { o.maxLength = maxLength }
            if let beta1 { o.beta1 = beta1 }
            if let beta2 { o.beta2 = beta2 }
            if let eps { o.eps = eps }
            if let momentum { o.momentum = momentum }
            if let shuffle { o.shuffle = shuffle }
            if let evalBatchSize { o.evalBatchSize = evalBatchSize }
            if let maxExamples { o.maxExamples = maxExamples }
            if let initBatches { o.initBatches = initBatches }
        }
    }
}
