import Foundation
import GraftTensor

/// A layer whose rank grows during training (IncreLoRA, TriAdaptLoRA). Its tensors are allocated at a fixed
/// `capacity` so the optimizer's state never changes shape; ranks beyond ``activeRank`` are masked out of the
/// forward pass, so they get zero gradients and leave the function unchanged until they are switched on.
public protocol GrowingRankLayer: LinearAdapterMethod {
    /// Ranks in use (a prefix of the capacity).
    var activeRank: Int { get }
    /// Ranks the layer's tensors hold.
    var capacity: Int { get }
    /// Switches on `count` more ranks (at most up to the capacity).
    func grow(by count: Int)
    /// The same update as plain LoRA factors with scaling 1: `ΔW = b · a`, `a` `[activeRank, in]`,
    /// `b` `[out, activeRank]`.
    func loraFactors() -> (a: Tensor, b: Tensor)
}

/// The `[capacity, 1]` 0/1 column that keeps the first `active` ranks.
func rankMask(active: Int, capacity: Int) -> Tensor {
    Tensor(shape: [capacity, 1], values: (0..<capacity).map { $0 < active ? 1 : 0 })
}

/// What a rank-growing method's allocator has done, for the training log and `graft train --report`.
struct RankGrowthRecord {
    /// Module paths, in the adapter's layer order.
    let paths: [String]
    /// `(step, ranks)` after every growth, starting with the initial ranks at step 0.
    private(set) var history: [(step: Int, ranks: [Int])]
    private var pending: [String] = []

    init(paths: [String], ranks: [Int]) {
        self.paths = paths
        history = [(0, ranks)]
    }

    /// Records the ranks after a growth at `step` and queues a log line naming the modules that grew.
    mutating func record(step: Int, ranks: [Int], budget: Int, method: String, note: String) {
        let before = history.last?.ranks ?? ranks
        let grown = zip(paths, zip(before, ranks)).filter { $0.1.0 != $0.1.1 }.map { "\($0.0) \($0.1.0)→\($0.1.1)" }
        history.append((step, ranks))
        pending.append("\(method) step \(step): \(grown.joined(separator: ", ")); total rank \(ranks.reduce(0, +))/\(budget) (\(note))")
    }

    /// The queued log lines, emptied.
    mutating func takeLines() -> [String] {
        defer { pending.removeAll() }
        return pending
    }

    /// Per-module ranks over time: one line per module with its rank after each growth step.
    func report(method: String, budget: Int) -> [String] {
        let steps = history.map(\.step)
        var lines = ["\(method) rank allocation (budget \(budget), total \(history.last?.ranks.reduce(0, +) ?? 0)); ranks at steps \(steps.map(String.init).joined(separator: " "))"]
        for (i, path) in paths.enumerated() {
            lines.append("  \(path): \(history.map { String($0.ranks[i]) }.joined(separator: " "))")
        }
        return lines
    }
}

extension NamedAdapter {
    /// For a rank-growing adapter (IncreLoRA, TriAdaptLoRA), the state dict and config of the equivalent plain
    /// PEFT LoRA: per module `lora_A.weight` `[r_i, in]` and `lora_B.weight` `[out, r_i]` with the method's
    /// scaling folded into B, `rank_pattern` and `alpha_pattern` both `r_i` (so PEFT's scaling is 1). Nil for
    /// other adapters.
    func exportedGrowingRankLoRA() throws -> (stateDict: [(key: String, tensor: Tensor)], config: AdapterConfig)? {
        let grown = layers.compactMap { $0.adapter as? any GrowingRankLayer }
        guard !grown.isEmpty, grown.count == layers.count else { return nil }
        var dict: [(key: String, tensor: Tensor)] = []
        var ranks: [String: Any] = [:]
        for ((path, _, _), layer) in zip(layers, grown) {
            let (a, b) = layer.loraFactors()
            dict.append(("base_model.model.\(path).lora_A.weight", a))
            dict.append(("base_model.model.\(path).lora_B.weight", b))
            ranks[path] = layer.activeRank
        }
        let maxRank = grown.map(\.activeRank).max() ?? 1
        var json: [String: Any] = ["peft_type": LoRAFactory.peftType, "r": maxRank, "lora_alpha": maxRank,
                                   "rank_pattern": ranks, "alpha_pattern": ranks,
                                   "lora_dropout": config.json["lora_dropout"] ?? 0.0]
        for key in ["target_modules", "layers_to_transform", "layers_pattern", "exclude_modules", "task_type",
                    "base_model_name_or_path", "revision", "modules_to_save"] {
            if let v = config.json[key] { json[key] = v }
        }
        return (dict, try AdapterConfig(json: json, source: config.source))
    }
}
