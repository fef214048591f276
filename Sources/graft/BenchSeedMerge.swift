import ArgumentParser
import Foundation
import Graft
import GraftAssets

/// Two tweet tasks for the merge experiments: each a binary question about a tweet's sentiment class.
struct TweetBinaryTask {
    /// Its name in reports.
    let name: String
    /// The sentiment class (``TweetCorpus/labels`` index) the task's positive label stands for.
    let positiveClass: Int

    /// `examples` relabelled for this task (1 where the tweet is of `positiveClass`, else 0).
    func relabel(_ examples: [LabeledText]) -> [LabeledText] {
        examples.map { LabeledText(text: $0.text, label: $0.label == positiveClass ? 1 : 0) }
    }
}

extension Bench {
    /// `graft bench seed-merge`: trains one LoRA adapter per tweet task (MiniLM, binary classification, each task its
    /// own frozen head drawn from its own seed, so only the LoRA updates differ), merges them with every combination
    /// type and reports both tasks' accuracy for each; then compresses each task's adapter with ComPEFT and 1-bit
    /// storage and reports file size and accuracy against the float32 adapter. Figures come from this run.
    struct SeedMerge: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "seed-merge",
            abstract: "Merge two tweet-task LoRA adapters with each method and compress them (ComPEFT, 1-bit); print both tasks' accuracy.")

        @Option(help: "Training examples per task (spread over the demo's train split).") var trainExamples: Int = 1500
        @Option(help: "Test examples per task (spread over the demo's test split).") var testExamples: Int = 500
        @Option(help: "Passes over the training data.") var epochs: Int = 1
        @Option(help: "Peak learning rate.") var lr: Float = 2e-3
        @Option(help: "LoRA rank.") var r: Int = 8
        @Option(help: "Comma-separated combination types to compare.")
        var methods: String = "linear,cat,svd,ties,ties_svd,dare_linear,dare_ties,magnitude_prune,copa"
        @Option(help: "Weight of each task's adapter in the merges.") var weight: Double = 1
        @Option(help: "density of the pruning methods (ties, dare_*, magnitude_prune*, copa).") var density: Double = 0.5
        @Option(help: "ComPEFT: fraction of each tensor's entries kept.") var compeftDensity: Double = 0.1
        @Option(help: "ComPEFT: comma-separated scales α of α·σ·sign to compare.") var compeftAlphas: String = "1,2,4"
        @Option(help: "Threads.") var threads: Int = 2
        @Option(help: "Seed of the data order, the adapters and DARE.") var seed: UInt64 = 1
        @Option(help: "Directory for the adapters and compressed files (default: a fresh temporary directory).") var workDir: String?

        func run() throws {
            try graft.run {
                Threading.setThreads(threads)
                let tasks = [TweetBinaryTask(name: "negative?", positiveClass: 0), TweetBinaryTask(name: "positive?", positiveClass: 2)]
                let (trainAll, testAll) = try TweetCorpus.demoSubsets(path: AssetCache.path(AssetCache.tweetsCSV))
                let train = TextData.labeled(trainAll).spaced(trainExamples), test = TextData.labeled(testAll).spaced(testExamples)
                guard case .labeled(let trainSet) = train, case .labeled(let testSet) = test else { return }
                let dir = workDir ?? NSTemporaryDirectory() + "graft-seed-merge-\(ProcessInfo.processInfo.processIdentifier)"
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                var options = Graft.TrainingOptions()
                options.epochs = epochs
                options.learningRate = lr
                options.seed = seed
                try options.validate()
                let adapterConfig: [String: Any] = ["peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
                                                    "target_modules": "all-linear", "modules_to_save": [String]()]
                print("command    graft bench seed-merge --train-examples \(trainExamples) --test-examples \(testExamples) --epochs \(epochs) --lr \(lr) --r \(r) --density \(density) --weight \(weight) --compeft-density \(compeftDensity) --compeft-alphas \(compeftAlphas) --seed \(seed)")
                print("tasks      \(tasks.map(\.name).joined(separator: ", ")) on the tweet corpus (demo split): \(trainSet.count) train / \(testSet.count) test tweets each; MiniLM, LoRA r=\(r) all-linear, frozen per-task head")
                // One session per task: the same frozen encoder, each task's own frozen head.
                var sessions: [GraftSession] = [], tests: [[TokenizedExample]] = []
                let names = ["task0", "task1"]
                for (k, task) in tasks.enumerated() {
                    var m = ModelOptions()
                    m.task = .sequenceClassification
                    m.numLabels = 2
                    m.seed = seed &+ UInt64(k) &* 7919
                    try m.validate()
                    let session = try AssetCache.openSession("minilm", options: m)
                    try session.addAdapter(name: names[k], config: AdapterConfig(json: adapterConfig, source: "seed-merge adapter"), seed: seed &+ UInt64(k))
                    let training = try GraftTrainingSession(session: session, adapterName: names[k], options: options)
                    let examples = try training.tokenize(.labeled(task.relabel(trainSet)))
                    tests.append(try training.tokenize(.labeled(task.relabel(testSet))))
                    let base = try session.adapted.withAdaptersDisabled { try training.trainer.evaluate(tests[k]) }
                    let start = Date()
                    try training.train(examples) { _ in true }
                    let after = try training.evaluate(tests[k])
                    print(String(format: "trained    %@ (%@): accuracy %.3f (frozen base + head %.3f), %.0f s", names[k], task.name, after.accuracy, base.accuracy, Date().timeIntervalSince(start)))
                    try session.saveAdapter(names[k], directory: "\(dir)/\(names[k])")
                    training.release()
                    sessions.append(session)
                }
                // Each session holds both adapters.
                for (k, session) in sessions.enumerated() {
                    let other = 1 - k
                    try session.loadAdapter(directory: "\(dir)/\(names[other])", name: names[other])
                }
                func accuracy(_ k: Int, adapter: String) throws -> Double {
                    let t = try GraftTrainingSession(session: sessions[k], adapterName: adapter, options: options)
                    defer { t.release() }
                    return try t.evaluate(tests[k]).accuracy
                }
                print("")
                print("| adapter | \(tasks[0].name) accuracy | \(tasks[1].name) accuracy | mean |")
                print("| --- | --- | --- | --- |")
                func row(_ label: String, _ a: Double, _ b: Double) {
                    print(String(format: "| %@ | %.3f | %.3f | %.3f |", label, a, b, (a + b) / 2))
                }
                for n in names { row("\(n) alone", try accuracy(0, adapter: n), try accuracy(1, adapter: n)) }
                for method in methods.split(separator: ",").map(String.init) {
                    let type = try CombinationType(peftName: method)
                    var acc: [Double] = []
                    var rank = 0
                    for (k, session) in sessions.enumerated() {
                        let request = AdapterCombination(adapters: names, weights: [weight, weight], type: type,
                                                         density: type.needsDensity ? density : nil, seed: seed)
                        rank = try session.adapted.addWeightedAdapter("merged", combining: request).rank
                        acc.append(try accuracy(k, adapter: "merged"))
                        try session.deleteAdapter(name: "merged")
                    }
                    row("\(method) (r=\(rank))", acc[0], acc[1])
                }
                try compressionReport(sessions: sessions, names: names, tasks: tasks, dir: dir, accuracy: accuracy)
            }
        }

        /// ComPEFT and 1-bit: each task's adapter written compressed, read back from disk into a working adapter,
        /// and evaluated on its own task.
        func compressionReport(sessions: [GraftSession], names: [String], tasks: [TweetBinaryTask], dir: String,
                               accuracy: (Int, String) throws -> Double) throws {
            print("")
            print("| task | storage | file bytes | vs float32 | accuracy |")
            print("| --- | --- | --- | --- | --- |")
            for (k, session) in sessions.enumerated() {
                let name = names[k]
                let float32File = try Self.fileSize("\(dir)/\(name)/adapter_model.safetensors")
                let full = try accuracy(k, name)
                print(String(format: "| %@ | float32 (PEFT safetensors) | %d | 1.00x | %.3f |", tasks[k].name, float32File, full))
                let adapter = try session.adapted.adapter(name)
                for (j, text) in compeftAlphas.split(separator: ",").enumerated() {
                    guard let alpha = Double(text.trimmingCharacters(in: .whitespaces)) else {
                        throw GraftError.invalid("--compeft-alphas: '\(text)' is not a number")
                    }
                    let compeft = try ComPEFTAdapter(compressing: adapter, density: compeftDensity, alpha: alpha)
                    let compeftBytes = try compeft.write(directory: "\(dir)/\(name)-compeft\(j)")
                    try session.adapted.addAdapter("\(name)_compeft\(j)", decompressing: try ComPEFTAdapter(directory: "\(dir)/\(name)-compeft\(j)"))
                    let compeftAccuracy = try accuracy(k, "\(name)_compeft\(j)")
                    print(String(format: "| %@ | ComPEFT density %.2f, α %.1f | %d | %.1fx smaller | %.3f |", tasks[k].name, compeftDensity,
                                 alpha, compeftBytes, Double(float32File) / Double(compeftBytes), compeftAccuracy))
                }
                let onebit = try OneBitAdapter(quantizing: adapter)
                let onebitBytes = try onebit.write(directory: "\(dir)/\(name)-1bit")
                try session.adapted.addAdapter("\(name)_1bit", dequantizing: try OneBitAdapter(directory: "\(dir)/\(name)-1bit"))
                let onebitAccuracy = try accuracy(k, "\(name)_1bit")
                print(String(format: "| %@ | 1-bit (sign + scale per group) | %d | %.1fx smaller | %.3f |", tasks[k].name, onebitBytes,
                             Double(float32File) / Double(onebitBytes), onebitAccuracy))
            }
        }

        static func fileSize(_ path: String) throws -> Int {
            let attributes = try FileManager.default.attributesOfItem(atPath: path)
            guard let size = attributes[.size] as? NSNumber else { throw GraftError(.io, "\(path): no file size") }
            return size.intValue
        }
    }
}
