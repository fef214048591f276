import Foundation
import GraftModels
import GraftTensor

/// Polytropon (Ponti et al., 2022) and Multi-Head Routing (Caccia et al., 2022), PEFT's `POLY` tuner: each
/// layer holds `n_skills` LoRA modules, each cut into `n_splits` heads along the input and output widths. A
/// router gives every task a weight per (split, skill), `w = σ(logits[task])` normalized over skills (a relaxed
/// Bernoulli sample while training); each example mixes the skills with its task's weights and adds
/// `x A_task B_task / r`. `n_splits == 1` is Poly, `> 1` is MHR. PEFT keys: `poly_lora_A`
/// `[splits, skills, in/splits, r]`, `poly_lora_B` `[splits, skills, r, out/splits]`,
/// `poly_router.module_logits` `[tasks, splits·skills]`.
///
/// Examples are the leading dimension of a 3-D input (rows of a 2-D one); their tasks come from
/// ``AdapterState/taskIDs`` (set with ``AdaptedModel/setTaskIDs(_:)``): one id per example, or a single id for
/// all. The routing differs per example, so the adapter does not merge.
public final class PolyLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `poly_lora_A`.
    public let loraA: Tensor
    /// `poly_lora_B`.
    public let loraB: Tensor
    /// `poly_router.module_logits`.
    public let moduleLogits: Tensor
    let rank: Int, tasks: Int, skills: Int, splits: Int, inFeatures: Int, outFeatures: Int

    init(base: Linear, rank: Int, tasks: Int, skills: Int, splits: Int, initWeights: Bool, state: AdapterState) throws {
        guard rank > 0, tasks > 0, skills > 0, splits > 0 else {
            throw GraftError.invalid("r (\(rank)), n_tasks (\(tasks)), n_skills (\(skills)) and n_splits (\(splits)) must be positive")
        }
        guard base.inFeatures % splits == 0, base.outFeatures % splits == 0 else {
            throw GraftError.invalid("n_splits \(splits) must divide in_features \(base.inFeatures) and out_features \(base.outFeatures)")
        }
        self.state = state
        self.rank = rank
        self.tasks = tasks
        self.skills = skills
        self.splits = splits
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        let dIn = inFeatures / splits, dOut = outFeatures / splits
        // nn.Linear's default (Kaiming-uniform, a = √5) per skill and split: bound 1/√fan_in.
        let aBound = 1 / Float(dIn).squareRoot()
        loraA = Tensor.randomUniform([splits, skills, dIn, rank], low: -aBound, high: aBound, rng: &state.rng).requiringGrad()
        if initWeights {
            loraB = Tensor(zeros: [splits, skills, rank, dOut]).requiringGrad()
        } else {
            let bBound = 1 / Float(rank).squareRoot()
            loraB = Tensor.randomUniform([splits, skills, rank, dOut], low: -bBound, high: bBound, rng: &state.rng).requiringGrad()
        }
        moduleLogits = Tensor.randomUniform([tasks, splits * skills], low: -1e-3, high: 1e-3, rng: &state.rng).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("poly_lora_A", loraA), ("poly_lora_B", loraB), ("poly_router.module_logits", moduleLogits)]
    }

    /// The mixing weights `[splits, examples, skills]` for the examples' tasks, recorded.
    func mixingWeights(examples: Int) -> Tensor {
        let ids = state.taskIDs ?? [0]
        let rows: [Int32] = (0..<examples).map { e in
            let id = ids.isEmpty ? 0 : ids[e % ids.count]
            return Int32(min(max(id, 0), tasks - 1))
        }
        var logits = embedding(rows, table: moduleLogits)  // [E, splits·skills]
        if state.isTraining {
            // RelaxedBernoulli(temperature 1).rsample(): σ(logits + log u − log(1 − u)).
            let noise = Tensor(zeros: logits.shape)
            for i in 0..<noise.count {
                let u = min(max(Double(state.rng.nextUniform()), 1e-7), 1 - 1e-7)
                noise.pointer[i] = Float(log(u) - log1p(-u))
            }
            logits = logits + noise
        }
        let p = sigmoid(logits).reshaped([examples * splits, skills])
        let total = matmul(p, Tensor(repeating: 1, shape: [skills, 1])) + Tensor(repeating: 1e-12, shape: [1])
        return (p * reciprocal(total)).reshaped([examples, splits, skills]).permuted([1, 0, 2])
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let examples = x.rank >= 3 ? x.shape[0] : x.rows
        guard examples > 0 else { return y }
        let perExample = x.count / (inFeatures * examples)
        let dIn = inFeatures / splits, dOut = outFeatures / splits
        let w = mixingWeights(examples: examples)
        // A per example: [splits, E, dIn·r] → [E, in, r]; B: [splits, E, r·dOut] → [E, r, out].
        let a = matmul(w, loraA.reshaped([splits, skills, dIn * rank]))
            .reshaped([splits, examples, dIn, rank]).permuted([1, 0, 2, 3]).reshaped([examples, inFeatures, rank])
        let b = matmul(w, loraB.reshaped([splits, skills, rank * dOut]))
            .reshaped([splits, examples, rank, dOut]).permuted([1, 2, 0, 3]).reshaped([examples, rank, outFeatures])
        let h = matmul(matmul(x.reshaped([examples, perExample, inFeatures]), a), b) * (1 / Float(rank))
        return y + h.reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? { nil }
}

/// Poly / MHR (`peft_type: "POLY"`): `r`, `n_tasks`, `n_skills`, `n_splits` (> 1 is MHR), `poly_type` "poly",
/// `init_weights`. Not mergeable: each example is routed by its task.
public enum PolyFactory: AdapterMethodFactory {
    public static let peftType = "POLY"
    public static let family = "routed mixture of LoRA skills (Poly / MHR)"
    public static let mergeable = false
    public static var taskCountKey: String? { "n_tasks" }
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 8, "n_tasks": 1, "n_skills": 4, "n_splits": 1, "poly_type": "poly", "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        if let type = try config.string("poly_type"), type != "poly" {
            throw GraftError(.unsupported, "\(config.source): poly_type '\(type)' is not supported (PEFT has only \"poly\")")
        }
        for key in ["r", "n_tasks", "n_skills", "n_splits"] {
            let v = try config.int(key, default: 1)
            guard v > 0 else { throw GraftError.invalid("\(config.source): '\(key)' must be positive, got \(v)") }
        }
        // The router is [n_tasks, n_skills] and each layer holds n_skills rank-r modules: bound the products too.
        let skills = try config.int("n_skills", default: 4)
        for other in ["n_tasks", "r"] {
            let v = try config.int(other, default: other == "r" ? 8 : 1)
            guard v * skills <= AdapterConfig.maximumSize else {
                throw GraftError.invalid("\(config.source): n_skills (\(skills)) × \(other) (\(v)) exceeds \(AdapterConfig.maximumSize)")
            }
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        do {
            return try PolyLayer(base: layer, rank: try config.int("r", default: 8), tasks: try config.int("n_tasks", default: 1),
                                 skills: try config.int("n_skills", default: 4), splits: try config.int("n_splits", default: 1),
                                 initWeights: try config.bool("init_weights", default: true), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}

extension AdaptedModel {
    /// The config key of adapter `a`'s task count when its method routes examples by task id (Poly's `n_tasks`,
    /// multitask prompt tuning's `num_tasks`, any method's ``AdapterMethodFactory/taskCountKey``); nil otherwise.
    public func taskCountKey(of a: NamedAdapter) -> String? {
        if a.config.peftType == MultitaskPromptTuningFactory.peftType { return "num_tasks" }
        return methods.linear[a.config.peftType]?.taskCountKey
    }

    /// Sets the task of each example for the next forward passes of task-routed adapters (Poly / MHR), as PEFT's
    /// `model(..., task_ids=...)`: one id per example (the leading dimension of the batch), or a single id for
    /// every example; nil routes everything to task 0. The ids stay set until changed. Throws when an id is
    /// outside `0..<n_tasks` of an attached Poly adapter (`num_tasks` of a multitask prompt-tuning one).
    public func setTaskIDs(_ ids: [Int]?) throws {
        for a in adapters {
            guard let key = taskCountKey(of: a) else { continue }
            let tasks = try a.config.int(key, default: 1)
            if let bad = ids?.first(where: { $0 < 0 || $0 >= tasks }) {
                throw GraftError.invalid("task id \(bad) is outside 0..<\(tasks) (\(key) of adapter '\(a.name)')")
            }
        }
        for a in adapters { a.state.taskIDs = ids }
    }
}
