import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Multitask prompt tuning (Wang et al., 2023): one shared prompt `P` `[n, d]` (`prompt_embeddings`) rescaled per
/// task by a rank-`r` matrix, `P ⊙ (C_t R_t)` with `C` `[tasks, n, r]` (`prefix_task_cols`) and `R` `[tasks, r, d]`
/// (`prefix_task_rows`). Each example's task comes from ``AdaptedModel/setTaskIDs(_:)`` (PEFT's `task_ids=`; task 0
/// when none is set); the virtual tokens are prepended as in prompt tuning (BERT encoders and Llama decoders).
public final class MultitaskPromptTuningLayer: VirtualTokenLayer, PromptAdapter {
    /// `C`, `[tasks, n, r]`, N(0, 0.02²) at first.
    public let taskColumns: Tensor
    /// `R`, `[tasks, r, d]`, N(0, 0.02²) at first.
    public let taskRows: Tensor

    init(host: any PromptHost, virtualTokens n: Int, tasks: Int, ranks: Int, state: AdapterState) {
        let d = host.embeddingWidth
        taskColumns = Tensor.randomNormal([tasks, n, ranks], std: 0.02, rng: &state.rng).requiringGrad()
        taskRows = Tensor.randomNormal([tasks, ranks, d], std: 0.02, rng: &state.rng).requiringGrad()
        // PEFT's RANDOM init leaves the shared prompt as torch.nn.Embedding draws it: N(0, 1).
        super.init(host: host, rows: n, width: d, state: state, std: 1)
    }

    var taskCount: Int { taskColumns.shape[0] }

    /// Task `t`'s virtual tokens `P ⊙ (C_t R_t)`, `[n, d]`, recorded.
    func prompt(task t: Int) -> Tensor {
        let n = taskColumns.shape[1], r = taskColumns.shape[2], d = taskRows.shape[2]
        let c = taskColumns.slice(dim: 0, t..<(t + 1)).reshaped([n, r])
        let rows = taskRows.slice(dim: 0, t..<(t + 1)).reshaped([r, d])
        return embeddings * matmul(c, rows)
    }

    /// The task of example `e` (ids outside `0..<tasks` are rejected when set; clamped here for safety).
    func task(ofExample e: Int) -> Int {
        guard let ids = state.taskIDs, !ids.isEmpty else { return 0 }
        return min(max(ids[e % ids.count], 0), taskCount - 1)
    }

    public func virtualTokens() -> Tensor { prompt(task: task(ofExample: 0)) }

    public func virtualTokens(rows: Int) -> Tensor {
        let n = embeddings.shape[0], d = embeddings.shape[1]
        var byTask: [Int: Tensor] = [:]
        let perRow = (0..<rows).map { e -> Tensor in
            let t = task(ofExample: e)
            if let p = byTask[t] { return p }
            let p = prompt(task: t).reshaped([1, n, d])
            byTask[t] = p
            return p
        }
        return rows == 1 ? perRow[0] : concat(perRow, dim: 0)
    }

    public override var namedParameters: [(name: String, tensor: Tensor)] {
        [("prefix_task_cols", taskColumns), ("prefix_task_rows", taskRows), ("prompt_embeddings", embeddings)]
    }

    public override func load(_ name: String, from tensor: Tensor) throws {
        try loadNamedParameter(name, from: tensor, hint: "num_tasks, num_ranks, num_virtual_tokens")
    }

    public override func attach() { host.promptAdapters.append(self) }
    public override func detach() { host.promptAdapters.removeAll { $0 === self } }

    /// PEFT's source-task initializations from a state dict saved by an earlier multitask run: `EXACT_SOURCE_TASK`
    /// (task `prompt_tuning_init_task`'s `C` and `R`), `AVERAGE_SOURCE_TASKS` (their means) — both with the shared
    /// prompt, as PEFT loads them into a one-task adapter — or `ONLY_SOURCE_SHARED` (the shared prompt alone).
    func initialize(from path: String, mode: String, task: Int, source: String) throws {
        let file = try SafeTensorsFile(contentsOf: path)
        let shared = try file.tensor("prompt_embeddings")
        guard shared.shape == embeddings.shape else {
            throw GraftError.format("\(path): 'prompt_embeddings' has shape \(shared.shape), the adapter expects \(embeddings.shape)")
        }
        embeddings.pointer.update(from: shared.pointer, count: shared.count)
        guard mode != "ONLY_SOURCE_SHARED" else { return }
        guard taskCount == 1 else {
            throw GraftError.invalid("\(source): prompt_tuning_init \(mode) loads one task's matrices, so num_tasks must be 1, got \(taskCount)")
        }
        for (key, target) in [("prefix_task_cols", taskColumns), ("prefix_task_rows", taskRows)] {
            let all = try file.tensor(key)
            guard all.rank == 3, Array(all.shape.dropFirst()) == Array(target.shape.dropFirst()), all.shape[0] > 0 else {
                throw GraftError.format("\(path): '\(key)' has shape \(all.shape), expected [tasks, \(target.shape[1]), \(target.shape[2])]")
            }
            let per = target.count, sourceTasks = all.shape[0]
            if mode == "EXACT_SOURCE_TASK" {
                guard task >= 0, task < sourceTasks else {
                    throw GraftError.invalid("\(source): prompt_tuning_init_task \(task) is outside the source's \(sourceTasks) tasks")
                }
                target.pointer.update(from: all.pointer + task * per, count: per)
            } else {
                for i in 0..<per {
                    var s: Float = 0
                    for t in 0..<sourceTasks { s += all.pointer[t * per + i] }
                    target.pointer[i] = s / Float(sourceTasks)
                }
            }
        }
    }
}

/// Multitask prompt tuning (`MULTITASK_PROMPT_TUNING`): `num_virtual_tokens`, `num_tasks`, `num_ranks`,
/// `prompt_tuning_init` `RANDOM`, or `EXACT_SOURCE_TASK` / `AVERAGE_SOURCE_TASKS` / `ONLY_SOURCE_SHARED` with
/// `prompt_tuning_init_state_dict_path` (a `.safetensors` file) and `prompt_tuning_init_task`. `TEXT` needs a
/// tokenizer and is not supported. BERT encoders and Llama decoders.
public enum MultitaskPromptTuningFactory: ModuleAdapterFactory {
    public static let peftType = "MULTITASK_PROMPT_TUNING"
    public static let family = "input (virtual tokens, per-task low-rank rescaling)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["num_virtual_tokens": 8, "num_tasks": 2, "num_ranks": 1] }

    public static let actsOnInput = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let mode = try config.string("prompt_tuning_init") ?? "RANDOM"
        let inference = try config.bool("inference_mode", default: false)
        let known = ["RANDOM", "TEXT", "EXACT_SOURCE_TASK", "AVERAGE_SOURCE_TASKS", "ONLY_SOURCE_SHARED"]
        guard known.contains(mode) else {
            throw GraftError.invalid("\(config.source): prompt_tuning_init '\(mode)' is not one of \(known.joined(separator: ", "))")
        }
        // A saved adapter's own tensors replace whatever the initialization would set.
        if inference {
            config.acknowledge("prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
                               "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task")
        } else if mode == "TEXT" {
            throw GraftError(.unsupported, "\(config.source): prompt_tuning_init 'TEXT' is not supported yet (RANDOM or a source task)")
        }
        guard let (host, n) = try virtualTokenTarget(module, config: config) else { return nil }
        let tasks = try config.int("num_tasks", default: 1), ranks = try config.int("num_ranks", default: 1)
        guard tasks > 0, ranks > 0 else {
            throw GraftError.invalid("\(config.source): 'num_tasks' (\(tasks)) and 'num_ranks' (\(ranks)) must be positive")
        }
        let layer = MultitaskPromptTuningLayer(host: host, virtualTokens: n, tasks: tasks, ranks: ranks, state: state)
        if !inference, mode != "RANDOM" {
            guard let path = try config.string("prompt_tuning_init_state_dict_path") else {
                throw GraftError.invalid("\(config.source): prompt_tuning_init \(mode) needs 'prompt_tuning_init_state_dict_path'")
            }
            try layer.initialize(from: path, mode: mode, task: try config.int("prompt_tuning_init_task", default: 0), source: config.source)
        }
        return layer
    }
}
