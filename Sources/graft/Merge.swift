import ArgumentParser
import Foundation
import Graft
import GraftAssets

/// `graft merge`: PEFT's `add_weighted_adapter` from the command line; loads LoRA adapter directories, combines
/// them and saves the result in PEFT's format.
struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Combine LoRA adapters as PEFT's add_weighted_adapter does and save the result.",
        discussion: """
            Each adapter is a PEFT directory, named in errors and weights by its directory name. Methods: \
            \(CombinationType.allCases.map(\.rawValue).joined(separator: ", ")). Example:
              graft merge out/task-a out/task-b --weights 0.7,0.5 --method ties --density 0.5 --output out/merged
              graft merge out/lora --save-merged-model out/minilm-lora   # merge_and_unload + save_pretrained
            """)

    @Argument(help: "PEFT LoRA adapter directories to combine.")
    var adapters: [String]
    @Option(help: "Comma-separated weights, one per adapter (negative weights subtract). Default: 1 each.")
    var weights: String?
    @Option(help: "combination_type: svd (PEFT's default), linear, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd; Graft's copa (CoPA-Merging).")
    var method: String = "svd"
    @Option(help: "Fraction of entries kept by the pruning methods (ties, dare_*, magnitude_prune*, copa).")
    var density: Double?
    @Option(help: "TIES's sign election: total or frequency.")
    var majoritySignMethod: String = "total"
    @Option(help: "Rank of an svd-type result (default: the largest source rank).")
    var svdRank: Int?
    @Option(help: "Quantile in [0, 1] at which the SVD factors are clamped (default: no clamping).")
    var svdClamp: Double?
    @Option(help: "Seed of DARE's random masks.")
    var seed: UInt64 = 0
    @Option(help: "Base model the adapters belong to: a path or 'minilm' / 'smollm2' (default: the first adapter's base_model_name_or_path).")
    var model: String?
    @Option(help: "Model task the adapters were trained for: base, seq-cls or causal-lm (default: the first adapter's task_type, else base).")
    var task: String?
    @Option(help: "Number of labels of a seq-cls head.")
    var numLabels: Int = 2
    @Option(help: "Directory to save the combined adapter to.")
    var output: String?
    @Option(help: "Also merge the combination into the base model (PEFT's merge_and_unload) and save that model to this directory (BERT: model.safetensors + config and tokenizer files; Llama: the .gguf with merged tensors re-encoded in their types).")
    var saveMergedModel: String?

    func run() throws {
        try graft.run {
            guard output != nil || saveMergedModel != nil else {
                throw GraftError.invalid("give --output (the combined adapter) and/or --save-merged-model (the merged base model)")
            }
            let recorded: (model: String?, task: String?) = try adapters.first.map(Self.recordedBase) ?? (nil, nil)
            let taskName = task ?? recorded.task ?? "base"
            guard let sessionTask = SessionTask(name: taskName) else {
                throw GraftError.invalid("--task '\(taskName)' is not one of: \(SessionTask.aliasList)")
            }
            guard let modelName = model ?? recorded.model else {
                throw GraftError.invalid("\(adapters.first ?? "?")/adapter_config.json names no base model Graft has (base_model_name_or_path); pass --model")
            }
            let parsedWeights = try weights.map(Self.parseWeights) ?? Array(repeating: 1, count: adapters.count)
            var modelOptions = ModelOptions()
            modelOptions.task = sessionTask
            modelOptions.numLabels = numLabels
            try modelOptions.validate()
            let session = try AssetCache.openSession(modelName, options: modelOptions)
            let names = Self.adapterNames(adapters)
            for (dir, name) in zip(adapters, names) {
                try session.loadAdapter(directory: dir, name: name)
            }
            let request = AdapterCombination(
                adapters: names, weights: parsedWeights, type: try CombinationType(peftName: method), svdRank: svdRank,
                svdClamp: svdClamp, density: density, majoritySignMethod: try MajoritySignMethod(peftName: majoritySignMethod),
                seed: seed)
            let report = try session.adapted.addWeightedAdapter("combined", combining: request)
            let sources = zip(names, parsedWeights).map { "\($0) (\($1))" }.joined(separator: ", ")
            let kind = report.rank > 0 ? "LoRA r\(report.rank)" : report.adapter.config.peftType
            var line = "merged     \(report.type.rawValue) of \(sources): \(kind), \(report.adapter.layers.count) layers"
            if let kept = report.keptFraction { line += String(format: ", DARE kept %.4f of entries", kept) }
            print(line)
            if let output {
                try session.saveAdapter("combined", directory: output)
                print("saved      \(output) (adapter_config.json + adapter_model.safetensors, loadable by PEFT)")
            }
            if let saveMergedModel {
                try session.mergeAndUnloadSave(adapter: "combined", directory: saveMergedModel)
                print("saved      \(saveMergedModel) (the base model with the combination merged in)")
            }
        }
    }

    /// The base model and task an adapter directory records: `base_model_name_or_path` as an existing path or the
    /// asset it is the hub id of (`minilm`, `smollm2`), and `task_type` as a task name; nil where it says nothing usable.
    static func recordedBase(_ directory: String) throws -> (model: String?, task: String?) {
        let path = directory + "/adapter_config.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw GraftError(.notFound, "\(path): cannot read the adapter config (is '\(directory)' a PEFT adapter directory?)")
        }
        let config = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] ?? [:]
        var model: String? = nil
        if let base = config["base_model_name_or_path"] as? String {
            model = AssetCache.models.first { $0.hubId == base }?.names.first ?? (FileManager.default.fileExists(atPath: base) ? base : nil)
        }
        let tasks = ["SEQ_CLS": "seq-cls", "CAUSAL_LM": "causal-lm"]
        return (model, (config["task_type"] as? String).flatMap { tasks[$0] })
    }

    /// "0.7,0.5" → [0.7, 0.5]; the error names the entry that is not a number.
    static func parseWeights(_ text: String) throws -> [Double] {
        try text.split(separator: ",", omittingEmptySubsequences: false).map { part in
            let s = part.trimmingCharacters(in: .whitespaces)
            guard let w = Double(s), w.isFinite else { throw GraftError.invalid("--weights: '\(s)' is not a finite number") }
            return w
        }
    }

    /// Each directory's last path component (dots replaced, as adapter names cannot hold them), made unique.
    static func adapterNames(_ dirs: [String]) -> [String] {
        var used: [String: Int] = [:]
        return dirs.map { dir in
            let base = URL(fileURLWithPath: dir).lastPathComponent.replacingOccurrences(of: ".", with: "_")
            let stem = base.isEmpty || base == "combined" ? "adapter" : base
            used[stem, default: 0] += 1
            return used[stem] == 1 ? stem : "\(stem)_\(used[stem] ?? 0)"
        }
    }
}
