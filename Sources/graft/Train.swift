import ArgumentParser
import Foundation
import Graft
import GraftAssets

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fine-tune MiniLM with LoRA on the tweet sentiment demo split and report test accuracy.")

    @Option(help: "Where to save the adapter.") var output: String = "out/demo-adapter"
    @OptionGroup var flags: TrainingFlags

    func run() throws {
        try graft.run {
            try ScaleOut.join()
            var options = Graft.TrainingOptions()
            options.epochs = 2
            options.warmupSteps = 20
            try flags.apply(to: &options)
            print("Graft demo: LoRA r8 α16 on query,value + classifier, MiniLM, tweet sentiment (3 classes)")
            let run = try TrainingRun(model: "minilm", task: .sequenceClassification, numLabels: 3, classNames: TweetCorpus.labels, adapter: [
                "peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                "target_modules": ["query", "value"], "modules_to_save": ["classifier"],
            ], options: options, computeDType: try flags.computeFormat())
            let (train, test) = try AssetCache.tweets(for: .sequenceClassification)
            try run.run(train: train, test: test, evalName: "test", output: output, checkpoint: try flags.checkpointPlan(), report: flags.report, initialEval: !flags.skipInitialEval)
        }
    }
}

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fine-tune an adapter from flags and/or a JSON config.",
        discussion: """
        A JSON config may hold any of: model, task ("seq-cls" | "causal-lm"), data, eval_data, output, max_length, \
        num_labels, moe_base (a directory graft moefy --output wrote: the decoder becomes that MoE base, for ESFT and \
        PERFT; ESFT without "experts" selects them from the training data), adapter (a PEFT adapter_config.json object), training (any training option by name: \
        learning_rate, weight_decay, warmup_steps, total_steps or max_steps, schedule, optimizer, max_grad_norm, \
        gradient_accumulation_steps, batch_size, seed, epochs, beta1, beta2, eps, momentum, shuffle, \
        eval_batch_size, max_examples, init_batches; the README's options table). The options in effect are printed first. \
        Flags override the file. --data takes a JSONL file ({"text","label"} for seq-cls; {"prompt","completion"} \
        or {"text"} for causal-lm) or "tweets" for the sentiment corpus (demo split).

        Data-parallel training: `mpirun -n N graft train ...` (Open MPI; Debian's openmpi-bin) runs N ranks that \
        each take --batch-size sequences of every global batch of N × --batch-size and average gradients with \
        MPI_Allreduce, so the run equals one process with --batch-size N × b (with dropout 0: dropout masks are \
        drawn per rank). Rank 0 alone evaluates, prints and saves; the ranks check at start-up that they got \
        the same options, data and model. Checkpoints (--checkpoint-dir) resume with any N that keeps \
        N × --batch-size. libmpi.so.40 is loaded only under mpirun (or GRAFT_MPI=1; GRAFT_MPI=0 never; \
        GRAFT_MPI_LIBRARY names another file); without it graft runs as one process. A collective waits at most \
        GRAFT_MPI_TIMEOUT seconds (default 600) for a rank that stopped responding. As root, add \
        --allow-run-as-root to mpirun.
        """)

    @Option(help: "JSON config file.") var config: String?
    @Option(help: "Model path or asset name (minilm, smollm2).") var model: String?
    @Option(help: "seq-cls or causal-lm (also seq_cls, sequence_classification, causal_lm).") var task: String?
    @Option(help: "Training data: a JSONL file or 'tweets'.") var data: String?
    @Option(help: "Evaluation data (JSONL); defaults to the tweets' test split with --data tweets.") var evalData: String?
    @Option(help: "Where to save the adapter (PEFT format).") var output: String?
    @Option(help: "PEFT method (peft_type).") var method: String?
    @Option(help: "LoRA rank.") var r: Int?
    @Option(help: "LoRA alpha.") var alpha: Double?
    @Option(help: "LoRA dropout.") var dropout: Double?
    @Option(help: "Comma-separated target modules, a regex, or all-linear.") var targetModules: String?
    @Option(help: "Comma-separated modules to train in full and save (e.g. classifier).") var modulesToSave: String?
    @Flag(help: "DoRA (LoRA with a learned magnitude).") var useDora = false
    @Flag(help: "rsLoRA scaling α/√r.") var useRslora = false
    @Option(help: "Number of classes (seq-cls).") var numLabels: Int?
    @Option(help: "Maximum tokens per example.") var maxLength: Int?
    @Option(help: "Optimizer: adamw or sgd.") var optimizer: String?
    @Option(help: "Use only N training examples, spread over the data.") var maxExamples: Int?
    @Option(help: "Evaluate on only N examples, spread over the evaluation data (the test split, --eval-data or the held-out tenth).")
    var maxEvalExamples: Int?
    @Option(help: "An MoE base saved by graft moefy --output (ESFT and PERFT tune its experts).") var moeBase: String?
    @OptionGroup var flags: TrainingFlags

    func run() throws {
        try graft.run {
            try ScaleOut.join()
            var file: [String: Any] = [:]
            if let config {
                guard let data = FileManager.default.contents(atPath: config),
                      let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                    throw GraftError.invalid("\(config): cannot read a JSON object")
                }
                file = object
                if let unknown = object.keys.sorted().first(where: { !Self.configKeys.contains($0) }) {
                    let hint = object["peft_type"] != nil ? " (a PEFT adapter_config.json goes under \"adapter\")" : ""
                    throw GraftError.invalid("\(config): unknown key '\(unknown)'\(hint); a train config holds \(Self.configKeys.sorted().joined(separator: ", "))")
                }
            }
            func value<T>(_ flag: T?, _ key: String) throws -> T? {
                if let flag { return flag }
                guard let raw = file[key], !(raw is NSNull) else { return nil }
                guard let typed = raw as? T else {
                    throw GraftError.invalid("\(config ?? "config"): '\(key)' must be \(T.self == String.self ? "a string" : "a whole number"), got \(raw)")
                }
                return typed
            }
            let taskName = try value(task, "task") ?? "seq-cls"
            let task = try SessionTask(trainingTaskName: taskName)
            let modelName = try value(model, "model") ?? (task == .sequenceClassification ? "minilm" : "smollm2")
            var adapter: [String: Any] = [:]
            if let raw = file["adapter"], !(raw is NSNull) {
                guard let object = raw as? [String: Any] else { throw GraftError.invalid("\(config ?? "config"): 'adapter' must be a JSON object (a PEFT adapter_config.json), got \(raw)") }
                adapter = object
            }
            if let method { adapter["peft_type"] = method.uppercased() }
            if adapter["peft_type"] == nil { adapter["peft_type"] = "LORA" }
            if let r { adapter["r"] = r }
            if let alpha { adapter["lora_alpha"] = alpha }
            if let dropout { adapter["lora_dropout"] = dropout }
            if useDora { adapter["use_dora"] = true }
            if useRslora { adapter["use_rslora"] = true }
            if let t = targetModules {
                adapter["target_modules"] = t.contains(",") || t.range(of: "^[A-Za-z0-9_.]+$", options: .regularExpression) != nil && t != "all-linear"
                    ? t.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) } : t
            }
            if let m = modulesToSave { adapter["modules_to_save"] = m.split(separator: ",").map(String.init) }
            // A method that picks its layers itself (ADAPTION_PROMPT's top attention blocks, the bottleneck
            // adapters) gets no default: it ignores one, or refuses one that is not its own (ADAPTION_PROMPT).
            let type = (adapter["peft_type"] as? String ?? "").uppercased()
            let picksLayers = AdapterMethodTable.all.modules[type]?.selectsLayers ?? false
            if adapter["target_modules"] == nil, !picksLayers, !AdapterConfig.typesOnMoEBlocks.contains(type) {
                adapter["target_modules"] = task == .sequenceClassification ? ["query", "value"] : ["q_proj", "v_proj"]
            }
            if task == .sequenceClassification && adapter["modules_to_save"] == nil { adapter["modules_to_save"] = ["classifier"] }
            // LoRA's r 8 and alpha 16 for methods that take them (their example config has the key); a method that
            // has no such key (TAPS, LoSiA, IncreLoRA's r) would refuse it as unhonoured.
            let example = (adapter["peft_type"] as? String).map { type in
                AdapterMethodTable.all.linear[type.uppercased()]?.exampleConfig(targets: []) ?? [:]
            } ?? [:]
            if adapter["r"] == nil, example["r"] != nil { adapter["r"] = 8 }
            if adapter["lora_alpha"] == nil, example["lora_alpha"] != nil { adapter["lora_alpha"] = 16 }

            var options = Graft.TrainingOptions()
            if let raw = file["training"], !(raw is NSNull), !(raw is [String: Any]) {
                throw GraftError.invalid("\(config ?? "config"): 'training' must be a JSON object of training options, got \(raw)")
            }
            if var training = file["training"] as? [String: Any] {
                // transformers' name for the step budget.
                if let steps = training.removeValue(forKey: "max_steps") { training["total_steps"] = steps }
                let text = String(decoding: try JSONSerialization.data(withJSONObject: training), as: UTF8.self)
                try options.update(json: text, source: "\(config ?? "config"): training")
            }
            if let optName = try value(optimizer, "optimizer") {
                guard let k = TrainerConfig.OptimizerKind(rawValue: optName.lowercased()) else {
                    throw GraftError.invalid("optimizer '\(optName)' is not one of adamw, sgd")
                }
                options.optimizer = k
            }
            try flags.apply(to: &options)
            options.maxLength = try value(maxLength, "max_length") ?? (task == .sequenceClassification ? 64 : 128)
            if let maxExamples { options.maxExamples = maxExamples }
            if let maxEvalExamples, maxEvalExamples < 1 {
                throw GraftError.invalid("--max-eval-examples must be ≥ 1, got \(maxEvalExamples)")
            }

            let output = try value(output, "output") ?? "out/adapter"
            let dataName = try value(data, "data") ?? AssetCache.tweetsDataName
            let evalName = try value(evalData, "eval_data")
            var train: TextData, test: TextData?, classNames: [String]?
            if dataName == AssetCache.tweetsDataName {
                let tweets = try AssetCache.tweets(for: task)
                train = tweets.train
                test = evalName == nil ? (task == .causalLM ? tweets.test.spaced(64) : tweets.test) : nil
                if task == .sequenceClassification { classNames = TweetCorpus.labels }
            } else {
                (train, classNames) = try Self.read(dataName, task: task, labels: nil)
                test = nil
            }
            if let evalName { test = try Self.read(evalName, task: task, labels: classNames).data }
            var numLabels = try value(self.numLabels, "num_labels") ?? 2
            if task == .sequenceClassification, try value(self.numLabels, "num_labels") == nil {
                let largest = [train, test].compactMap { data -> Int? in
                    guard case .labeled(let texts)? = data else { return nil }
                    return texts.map(\.label).max()
                }.max() ?? 0
                numLabels = max(classNames?.count ?? 0, largest + 1)
            }
            if let names = classNames, names.count < numLabels {
                classNames = names + (names.count..<numLabels).map { "LABEL_\($0)" }
            }
            if let maxExamples { train = train.spaced(maxExamples) }
            let heldOut = test == nil
            if test == nil { (train, test) = try holdOut(train) }
            if let maxEvalExamples { test = test?.spaced(maxEvalExamples) }
            let run = try TrainingRun(model: modelName, task: task, numLabels: numLabels, classNames: classNames,
                                      adapter: adapter, options: options, computeDType: try flags.computeFormat(),
                                      moeBase: try value(moeBase, "moe_base"), selectionData: train)
            try run.run(train: train, test: test ?? train, evalName: heldOut ? "held-out" : (task == .causalLM ? "eval" : "test"),
                        output: output, checkpoint: try flags.checkpointPlan(), report: flags.report, initialEval: !flags.skipInitialEval)
        }
    }

    /// The keys a `--config` file may hold.
    static let configKeys: Set<String> = ["model", "task", "data", "eval_data", "output", "max_length", "num_labels",
                                          "adapter", "training", "optimizer", "moe_base"]

    /// The JSONL file at `path` as data for `task`; for classification, string labels are numbered by `labels`
    /// when given (an unknown one is an error naming the line), else by first appearance, and the names returned.
    static func read(_ path: String, task: SessionTask, labels: [String]?) throws -> (data: TextData, labels: [String]?) {
        guard task == .sequenceClassification else { return (.completions(try JSONLDataset.loadCompletions(path: path)), nil) }
        var names = labels ?? []
        let texts = try JSONLDataset.loadClassification(path: path, labelNames: &names)
        return (.labeled(texts), names.isEmpty ? nil : names)
    }
}

/// Without evaluation data, every tenth example is held out of training and evaluated on instead (never the
/// training examples themselves); says so on stdout.
func holdOut(_ data: TextData) throws -> (train: TextData, heldOut: TextData) {
    switch data {
    case .labeled(let items): let (a, b) = try holdOut(items); return (.labeled(a), .labeled(b))
    case .completions(let items): let (a, b) = try holdOut(items); return (.completions(a), .completions(b))
    }
}

/// ``holdOut(_:)`` over a list.
func holdOut<T>(_ items: [T]) throws -> (train: [T], heldOut: [T]) {
    guard items.count >= 2 else {
        throw GraftError.invalid("the training data has \(items.count) example(s); give --eval-data or at least 2 examples (every 10th is held out for evaluation)")
    }
    let heldOutIndices = Set(stride(from: 9, to: items.count, by: 10)).union([items.count - 1])
    let heldOut = heldOutIndices.sorted().map { items[$0] }
    let train = items.indices.filter { !heldOutIndices.contains($0) }.map { items[$0] }
    print("eval       no --eval-data: \(heldOut.count) of \(items.count) examples (every 10th) held out of training for evaluation")
    return (train, heldOut)
}
