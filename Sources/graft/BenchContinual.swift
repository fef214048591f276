import ArgumentParser
import Foundation
import Graft
import GraftAssets

extension Bench {
    /// `graft bench continual`: class-incremental learning over the tweet sentiment classes, one task after another
    /// (default: {negative, positive}, then {neutral}), with MiniLM and LoRA. Compares sequential fine-tuning of one
    /// adapter and its head, incremental adapter tuning (one shared adapter; class prototypes moved by semantic shift
    /// compensation, nearest-prototype prediction; also without the compensation), and MOS (one adapter per task
    /// merged toward the earlier ones while it trains; self-refined retrieval of the adapter per input). Prints the
    /// accuracy over all classes seen so far after each task. Figures come from this run.
    struct Continual: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Class-incremental accuracy over a task sequence of tweet classes: sequential fine-tuning, incremental adapter tuning, MOS.")

        @Option(help: "Tasks as class lists separated by ';' (0 negative, 1 neutral, 2 positive).") var tasks: String = "0,2;1"
        @Option(help: "Training examples per task (spread over the task's share of the demo's train split).") var trainExamples: Int = 800
        @Option(help: "Test examples per class (spread over the demo's test split).") var testPerClass: Int = 150
        @Option(help: "Passes over each task's data.") var epochs: Int = 1
        @Option(help: "Peak learning rate.") var lr: Float = 1e-3
        @Option(help: "LoRA rank.") var r: Int = 8
        @Option(help: "MOS adapter momentum (pull toward the earlier adapters' mean after each step).") var momentum: Float = 0.1
        @Option(help: "Threads.") var threads: Int = 2
        @Option(help: "Seed.") var seed: UInt64 = 1

        func run() throws {
            try graft.run {
                Threading.setThreads(threads)
                let taskClasses = try tasks.split(separator: ";").map { part in
                    try part.split(separator: ",").map { s -> Int in
                        guard let c = Int(s.trimmingCharacters(in: .whitespaces)), TweetCorpus.labels.indices.contains(c) else {
                            throw GraftError.invalid("--tasks: '\(s)' is not a class index 0...\(TweetCorpus.labels.count - 1)")
                        }
                        return c
                    }
                }
                let (trainAll, testAll) = try TweetCorpus.demoSubsets(path: AssetCache.path(AssetCache.tweetsCSV))
                print("command    graft bench continual --tasks '\(tasks)' --train-examples \(trainExamples) --test-per-class \(testPerClass) --epochs \(epochs) --lr \(lr) --r \(r) --momentum \(momentum) --seed \(seed)")
                print("sequence   " + taskClasses.enumerated().map { "task \($0): {\($1.map { TweetCorpus.labels[$0] }.joined(separator: ", "))}" }.joined(separator: " → "))
                var options = Graft.TrainingOptions()
                options.epochs = epochs
                options.learningRate = lr
                options.seed = seed
                try options.validate()
                var m = ModelOptions()
                m.task = .sequenceClassification
                m.numLabels = TweetCorpus.labels.count
                m.seed = seed
                try m.validate()
                let session = try AssetCache.openSession("minilm", options: m)
                let lab = ContinualLab(session: session, options: options, rank: r, seed: seed)
                let trainSets = try taskClasses.map { classes in
                    try lab.tokenize(trainAll.filter { classes.contains($0.label) }, limit: trainExamples)
                }
                let testSets = try taskClasses.map { classes in
                    try classes.flatMap { c in try lab.tokenize(testAll.filter { $0.label == c }, limit: testPerClass) }
                }
                var rows: [(String, [Double])] = []
                rows.append(("sequential fine-tuning (adapter + head)", try lab.sequential(trainSets, testSets)))
                let (compensated, plain) = try lab.incremental(trainSets, testSets, classes: taskClasses)
                rows.append(("incremental adapter tuning, shift compensated", compensated))
                rows.append(("incremental adapter tuning, no compensation", plain))
                let (mos, retrieval) = try lab.mos(trainSets, testSets, classes: taskClasses, momentum: momentum)
                rows.append(("MOS (merged task adapters + self-refined retrieval)", mos))
                print("")
                print("| method | " + taskClasses.indices.map { "after task \($0)" }.joined(separator: " | ") + " |")
                print("|" + String(repeating: " --- |", count: taskClasses.count + 1))
                for (name, acc) in rows { print("| \(name) | " + acc.map { String(format: "%.3f", $0) }.joined(separator: " | ") + " |") }
                print("")
                print("MOS retrieval: the right task's adapter for " + retrieval.map { String(format: "%.3f", $0) }.joined(separator: ", ") + " of the test inputs after each task")
            }
        }
    }
}

/// The continual-learning runs of `graft bench continual` on one session (adapters are added and removed).
final class ContinualLab {
    let session: GraftSession
    let options: Graft.TrainingOptions
    let rank: Int
    let seed: UInt64

    init(session: GraftSession, options: Graft.TrainingOptions, rank: Int, seed: UInt64) {
        self.session = session
        self.options = options
        self.rank = rank
        self.seed = seed
    }

    /// LoRA on every Linear of the encoder, the 3-class head trained with it (the cross-entropy signal).
    func config() throws -> AdapterConfig {
        try AdapterConfig(json: ["peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
                                 "target_modules": "all-linear", "modules_to_save": ["classifier"]],
                          source: "continual adapter")
    }

    func tokenize(_ examples: [LabeledText], limit: Int) throws -> [TokenizedExample] {
        guard case .labeled(let picked) = TextData.labeled(examples).spaced(limit) else { return [] }
        return try session.taskModel.examples(.labeled(picked), tokenizer: session.model.tokenizer, maxLength: options.maxLength)
    }

    /// Trains adapter `name` on `examples`; `afterStep` runs after every optimizer step.
    func train(_ name: String, _ examples: [TokenizedExample], afterStep: () throws -> Void = {}) throws {
        let t = try GraftTrainingSession(session: session, adapterName: name, options: options)
        defer { t.release() }
        var failure: Error?
        try t.train(examples) { _ in
            do { try afterStep() } catch { failure = error; return false }
            return true
        }
        if let failure { throw failure }
    }

    /// The mean final hidden state of each example under adapter `name` (nil: no adapter), `[n, hidden]`.
    func features(_ examples: [TokenizedExample], adapter name: String?) throws -> Tensor {
        let h = session.taskModel.hiddenSize
        let out = Tensor(zeros: [examples.count, h])
        func run() throws {
            for (i, e) in examples.enumerated() {
                let batch = try TokenBatch(ids: e.ids, batchSize: 1, length: e.ids.count)
                let states = try withNoGrad { try session.taskModel.hiddenStates(batch) }
                let rows = states.count / h
                for j in 0..<h {
                    var s: Float = 0
                    for t in 0..<rows { s += states.pointer[t * h + j] }
                    out.pointer[i * h + j] = s / Float(max(rows, 1))
                }
            }
        }
        if let name {
            try session.adapted.setActiveAdapter(name)
            session.adapted.setAdaptersDisabled(false)
            try run()
        } else {
            try session.adapted.withAdaptersDisabled { try run() }
        }
        return out
    }

    /// The rows of `features` whose examples are of class `c`, `[k, hidden]`.
    func rows(_ features: Tensor, _ examples: [TokenizedExample], class c: Int) -> Tensor {
        let h = features.shape[1]
        let picked = examples.indices.filter { examples[$0].label == c }
        let out = Tensor(zeros: [picked.count, h])
        for (k, i) in picked.enumerated() { (out.pointer + k * h).update(from: features.pointer + i * h, count: h) }
        return out
    }

    func accuracy(_ classifier: PrototypeClassifier, _ features: Tensor, _ examples: [TokenizedExample], classIDs: [Int]) throws -> Double {
        let h = features.shape[1]
        var right = 0
        for (i, e) in examples.enumerated() {
            let p = try classifier.predict(UnsafeBufferPointer(start: features.pointer + i * h, count: h))
            if classIDs[p] == Int(e.label) { right += 1 }
        }
        return Double(right) / Double(max(examples.count, 1))
    }

    /// One adapter with its head fine-tuned task after task; accuracy of its head on all classes seen so far.
    func sequential(_ trains: [[TokenizedExample]], _ tests: [[TokenizedExample]]) throws -> [Double] {
        try session.addAdapter(name: "sequential", config: try config(), seed: seed)
        defer { try? session.deleteAdapter(name: "sequential") }
        var out: [Double] = []
        for t in trains.indices {
            try train("sequential", trains[t])
            let e = try GraftTrainingSession(session: session, adapterName: "sequential", options: options)
            out.append(try e.evaluate(Array(tests[0...t].joined())).accuracy)
            e.release()
        }
        return out
    }

    /// Incremental adapter tuning: one shared adapter tuned on every task; class prototypes (and a copy never
    /// compensated) classify by cosine similarity.
    func incremental(_ trains: [[TokenizedExample]], _ tests: [[TokenizedExample]], classes: [[Int]]) throws -> ([Double], [Double]) {
        try session.addAdapter(name: "shared", config: try config(), seed: seed)
        defer { try? session.deleteAdapter(name: "shared") }
        let h = session.taskModel.hiddenSize
        var compensated = PrototypeClassifier(dimension: h), plain = PrototypeClassifier(dimension: h)
        var classIDs: [Int] = []
        var withShift: [Double] = [], without: [Double] = []
        for t in trains.indices {
            let before = try features(trains[t], adapter: "shared")
            try train("shared", trains[t])
            let after = try features(trains[t], adapter: "shared")
            if !classIDs.isEmpty {
                // σ: the median distance of this task's (pre-tuning) samples to the old prototypes.
                var distances: [Float] = []
                for p in compensated.prototypes {
                    for i in 0..<trains[t].count {
                        var d: Float = 0
                        for j in 0..<h { let e = before.pointer[i * h + j] - p[j]; d += e * e }
                        distances.append(d.squareRoot())
                    }
                }
                distances.sort()
                let sigma = max(distances[distances.count / 2], 1e-3)
                let (moved, shifts) = try IncrementalAdapterTuning.compensate(prototypes: compensated.prototypes, before: before, after: after, sigma: sigma)
                print(String(format: "incremental task %d: σ %.3f, prototype shifts ", t, sigma) + shifts.map { String(format: "%.3f", $0) }.joined(separator: ", "))
                for (c, p) in moved.enumerated() { try compensated.setPrototype(class: c, p) }
            }
            for c in classes[t] {
                let mean = PrototypeClassifier.mean(rows(after, trains[t], class: c))
                try compensated.setPrototype(class: classIDs.count, mean)
                try plain.setPrototype(class: classIDs.count, mean)
                classIDs.append(c)
            }
            let test = Array(tests[0...t].joined())
            let f = try features(test, adapter: "shared")
            withShift.append(try accuracy(compensated, f, test, classIDs: classIDs))
            without.append(try accuracy(plain, f, test, classIDs: classIDs))
        }
        return (withShift, without)
    }
}
