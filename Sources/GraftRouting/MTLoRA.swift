import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

/// MTLoRA (Agiza et al., 2024, "MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task Learning", seed #41)
/// on one Linear layer: a task-agnostic low-rank module every example shares plus, on the layers chosen as
/// task-specific, one low-rank module per task, each example running its own task's:
///
///     y = W x + b + (α/r) · B A x + (α_t/r_t) · B_τ A_τ x,   τ = the example's task id
///
/// The paper places task-specific modules at the ends of a hierarchical encoder's stages and feeds their per-task
/// features to task decoders; in a single-output model Graft reads "the task chosen per example" as the example's
/// id from ``AdaptedModel/setTaskIDs(_:)`` (Poly's mechanism: one id per example, the leading dimension of a 3-D
/// input or the rows of a 2-D one; one id for all; nil is task 0), so one batch can mix tasks.
///
/// Parameters (Graft keys): the shared module under LoRA's keys, `lora_A.weight` `[r, in]` and `lora_B.weight`
/// `[out, r]`; the task modules `mtlora_task_A` `[n_tasks, r_t, in]` and `mtlora_task_B` `[n_tasks, out, r_t]`.
/// A Kaiming-uniform (bound `1/√in`), B zero: a new adapter leaves the layer as it was. The task modules run as
/// routed experts (each task's tokens gathered, two GEMMs each); the task "router" is the id, so
/// ``statistics`` counts tokens per task (entropy 0). Not mergeable: the weight change depends on the example.
public final class MTLoRALayer: LinearAdapterMethod, RouterStatisticsReporting {
    public let state: AdapterState
    /// The module path (for statistics).
    public let path: String
    /// Shared (task-agnostic) down-projection `[r, in]`.
    public let sharedA: Tensor
    /// Shared up-projection `[out, r]`.
    public let sharedB: Tensor
    /// Per-task down-projections `[n_tasks, r_t, in]`; nil on layers without task-specific modules.
    public let taskA: Tensor?
    /// Per-task up-projections `[n_tasks, out, r_t]`.
    public let taskB: Tensor?
    /// `α / r` of the shared module.
    public let sharedScaling: Float
    /// `α_t / r_t` of the task modules.
    public let taskScaling: Float
    /// Tasks `n_tasks`.
    public let tasks: Int
    /// Tokens per task module since the last reset (`experts` = tasks; nil without task modules).
    public internal(set) var statistics: RouterLayerStatistics?

    /// The modules on `base`: shared rank `rank` (scaling `alpha/rank`), and when `taskSpecific` one rank-`taskRank`
    /// module per task (scaling `taskAlpha/taskRank`).
    public init(base: Linear, path: String, rank: Int, alpha: Float, tasks: Int, taskSpecific: Bool, taskRank: Int,
                taskAlpha: Float, state: AdapterState) {
        self.state = state
        self.path = path
        self.tasks = tasks
        let bound = 1 / Float(base.inFeatures).squareRoot()
        sharedA = Tensor.randomUniform([rank, base.inFeatures], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        sharedB = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        sharedScaling = alpha / Float(rank)
        taskScaling = taskAlpha / Float(taskRank)
        if taskSpecific {
            taskA = Tensor.randomUniform([tasks, taskRank, base.inFeatures], low: -bound, high: bound, rng: &state.rng).requiringGrad()
            taskB = Tensor(zeros: [tasks, base.outFeatures, taskRank]).requiringGrad()
            statistics = RouterLayerStatistics(path: path + ".mtlora_task", experts: tasks)
        } else {
            taskA = nil
            taskB = nil
        }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        var out = [("lora_A.weight", sharedA), ("lora_B.weight", sharedB)]
        if let taskA, let taskB { out += [("mtlora_task_A", taskA), ("mtlora_task_B", taskB)] }
        return out
    }

    public func deltaWeight(base: Linear) -> Tensor? { nil }

    public var routerStatistics: [RouterLayerStatistics] { statistics.map { [$0] } ?? [] }

    public func resetRouterStatistics() { statistics = statistics.map { RouterLayerStatistics(path: $0.path, experts: $0.experts) } }

    /// The task of each of `tokens` rows, `perExample` consecutive rows per example (ids clamped to the tasks).
    func tokenTasks(tokens: Int, perExample: Int) -> [Int] {
        let ids = state.taskIDs ?? [0]
        return (0..<tokens).map { t in
            let e = t / max(perExample, 1)
            return min(max(ids.isEmpty ? 0 : ids[e % ids.count], 0), tasks - 1)
        }
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let examples = x.rank >= 3 ? x.shape[0] : x.rows
        guard examples > 0 else { return y }
        let x2 = x.reshaped([x.rows, x.lastDim])
        var delta = linear(linear(x2, sharedA), sharedB) * sharedScaling
        if let taskA, let taskB {
            let tokens = x2.rows
            // The task "router": a one-hot gate per token on its example's task module.
            let gates = Tensor(zeros: [tokens, tasks])
            let pg = gates.pointer
            for (t, task) in tokenTasks(tokens: tokens, perExample: tokens / examples).enumerated() { pg[t * tasks + task] = 1 }
            let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: pg, count: gates.count), tokens: tokens, experts: tasks,
                                      mode: .topK, topK: 1, topP: 1, capacityFactor: nil)
            statistics?.record(probs: gates, gates: gates, plan: plan)
            delta = delta + routedLoRAExperts(x2, a: taskA, b: taskB, gates: gates, rows: plan.rows, scaling: taskScaling)
        }
        return y + delta.reshaped(y.shape)
    }
}

/// MTLoRA (`peft_type: "MTLORA"`, Graft's own type): a shared LoRA plus per-task LoRAs chosen by each example's
/// task id. Keys: `r` (8) and `lora_alpha` (8) of the task-agnostic module, `n_tasks` (1), `task_r` (`r`) and
/// `task_alpha` (`lora_alpha`) of the task-specific ones, `task_specific_modules` (names or a regex, a subset of the
/// targets that also get per-task modules; every target when absent), `target_modules`, `lora_dropout` (0 only).
public enum MTLoRAFactory: AdapterMethodFactory {
    public static let peftType = "MTLORA"
    public static let family = "task-agnostic plus task-specific LoRA, routed by task id (MTLoRA)"
    public static let mergeable = false
    public static var taskCountKey: String? { "n_tasks" }

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 4, "lora_alpha": 8, "n_tasks": 2, "task_r": 2, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        for (key, fallback) in [("r", 8), ("n_tasks", 1), ("task_r", try config.int("r", default: 8))] {
            let v = try config.int(key, default: fallback)
            guard v >= 1, v <= AdapterConfig.maximumSize else {
                throw GraftError.invalid("\(config.source): '\(key)' must be in 1...\(AdapterConfig.maximumSize), got \(v)")
            }
        }
        let tasks = try config.int("n_tasks", default: 1), taskRank = try config.int("task_r", default: try config.int("r", default: 8))
        guard tasks * taskRank <= AdapterConfig.maximumSize else {
            throw GraftError.invalid("\(config.source): n_tasks (\(tasks)) × task_r (\(taskRank)) exceeds \(AdapterConfig.maximumSize)")
        }
        let alpha = try config.double("lora_alpha", default: 8)
        for (key, v) in [("lora_alpha", alpha), ("task_alpha", try config.double("task_alpha", default: alpha))] where !v.isFinite {
            throw GraftError.invalid("\(config.source): '\(key)' must be finite, got \(v)")
        }
        let p = try config.double("lora_dropout", default: 0)
        guard p == 0 else { throw GraftError(.unsupported, "\(config.source): 'lora_dropout' \(p) is not supported by MTLORA (use 0)") }
        if let v = config.value("task_specific_modules"), !(v is [String]), !(v is String) {
            throw GraftError.invalid("\(config.source): 'task_specific_modules' must be a list of names or a regex, got \(v)")
        }
    }

    /// Whether the target at `path` gets task-specific modules (`task_specific_modules`; all when absent).
    static func isTaskSpecific(_ config: AdapterConfig, path: String) -> Bool {
        TargetMatcher.subsetSelects(config.value("task_specific_modules"), path: path) ?? true
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let r = try config.int("r", default: 8), alpha = try config.double("lora_alpha", default: 8)
        return MTLoRALayer(base: layer, path: path, rank: r, alpha: Float(alpha), tasks: try config.int("n_tasks", default: 1),
                           taskSpecific: isTaskSpecific(config, path: path), taskRank: try config.int("task_r", default: r),
                           taskAlpha: Float(try config.double("task_alpha", default: alpha)), state: state)
    }
}
