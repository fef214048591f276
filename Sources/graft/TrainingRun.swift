import Foundation
import Graft
import GraftAssets

/// One fine-tuning run of `graft demo` or `graft train`: the model opened for the task, the adapter added as
/// `"default"`, and the library's one training facade around them.
struct TrainingRun {
    /// The trainer (its session holds the model and adapter).
    let training: GraftTrainingSession
    /// The model argument as given.
    let modelName: String

    /// Opens `model` (a path or asset name) for `task`, adds `adapter` and creates the trainer. The head and the
    /// adapter are drawn from `options.seed`; `classNames` name the classifier's classes. `moeBase` (a directory
    /// `graft moefy --output` wrote) makes the decoder that MoE base first; an ESFT adapter without `experts` gets
    /// them selected from `selectionData` (the training data).
    init(model: String, task: SessionTask, numLabels: Int, classNames: [String]?, adapter: [String: Any],
         options: Graft.TrainingOptions, computeDType: ComputeDType = .float32, moeBase: String? = nil,
         selectionData: TextData? = nil) throws {
        var modelOptions = ModelOptions()
        modelOptions.computeDType = computeDType
        modelOptions.task = task
        modelOptions.numLabels = numLabels
        modelOptions.seed = options.seed
        modelOptions.moeBase = moeBase
        try modelOptions.validate()
        let session = try AssetCache.openSession(model, options: modelOptions)
        if let classNames { try session.setClassNames(classNames) }
        var adapter = adapter
        if let moeBase, case .decoder(let llama) = session.model.backbone {
            print("moe base   \(moeBase) (\(llama.moeBlocks.first?.experts ?? 0) experts per layer, top-\(llama.moeBlocks.first?.topK ?? 0))")
        }
        if (adapter["peft_type"] as? String)?.uppercased() == ESFTFactory.peftType, adapter["experts"] == nil {
            guard case .decoder(let llama) = session.model.backbone, !llama.moeBlocks.isEmpty, let data = selectionData else {
                throw GraftError.invalid("ESFT tunes the experts of an MoE base: give moe_base (a graft moefy --output directory)")
            }
            let scoreName = adapter["score_function"] as? String ?? ESFTScore.token.rawValue
            guard let score = ESFTScore(rawValue: scoreName) else {
                throw GraftError.invalid("adapter config: 'score_function' must be \"token\" or \"gate\", got \"\(scoreName)\"")
            }
            guard let topP = adapter["top_p"].map({ $0 as? Double }) ?? 0.2 else {
                throw GraftError.invalid("adapter config: 'top_p' must be a number, got \(adapter["top_p"] ?? "")")
            }
            let examples = try session.taskModel.examples(data, tokenizer: session.model.tokenizer, maxLength: options.maxLength)
            let selected = try ESFT.configuration(model: llama, sequences: examples.map(\.ids), score: score, topP: topP)
            adapter.merge(selected) { _, new in new }
            let counts = (selected["experts"] as? [String: [Int]] ?? [:]).values.map(\.count)
            print(String(format: "esft       %@ score, top_p %.2f: %d experts selected over %d layers (%.2f per layer) from the training data",
                         score.rawValue, topP, counts.reduce(0, +), counts.count, Double(counts.reduce(0, +)) / Double(max(counts.count, 1))))
        }
        try session.addAdapter(name: "default", config: AdapterConfig(json: adapter, source: "adapter config"), seed: options.seed)
        training = try GraftTrainingSession(session: session, adapterName: "default", options: options)
        modelName = model
        print("options    \(options.json)")
        if session.computeDType != .float32 { print("compute    frozen weights multiplied in \(session.computeDType.rawValue)") }
    }

    /// Where and how often to checkpoint, and whether to resume from there.
    struct CheckpointPlan {
        /// The checkpoint directory (one checkpoint, replaced atomically).
        var directory: String
        /// Steps between saves; 0 = only after the last step.
        var every: Int
        /// Load the checkpoint in `directory` first when there is one.
        var resume: Bool
    }

    /// Trains on `train`, evaluates on `test` (called `evalName` in the report) before and after, prints the
    /// report (accuracy for classification, perplexity for a causal LM) and saves the adapter to `output`.
    /// Data-parallel (under mpirun) every rank trains, rank 0 alone evaluates, reports and saves.
    /// With `report`, prints what the adapter's training hooks decided after training (rank allocation); without
    /// `initialEval`, skips the evaluation before training.
    func run(train: TextData, test: TextData, evalName: String, output: String?, checkpoint: CheckpointPlan? = nil,
             report showReport: Bool = false, initialEval: Bool = true) throws {
        let start = Date()
        let session = training.session
        let rank0 = training.rank == 0
        let trainer = training.trainer
        if let checkpoint, checkpoint.resume,
           FileManager.default.fileExists(atPath: checkpoint.directory + "/" + AtomicDirectory.manifestName) {
            try trainer.loadCheckpoint(directory: checkpoint.directory)
            print("resumed    \(checkpoint.directory) at step \(trainer.globalStep)")
        }
        let trainSet = try training.tokenize(train)
        let testSet = try training.tokenize(test)
        let tokens = trainSet.reduce(0) { $0 + $1.ids.count }
        let adapter = training.trainer.adapter
        if let pending = adapter.pendingDataInitialization {
            print("init       init_lora_weights \"\(pending.rawValue)\" from the first \(training.options.initBatches) training batches before step 1")
        }
        print("model      \(session.model.path) (\(session.model.architecture.rawValue), \(ModelInspector.formatCount(session.model.root.parameterCount)) parameters, frozen)")
        // Module adapters (ESFT, PERFT, LN tuning) count their modules; the wording stays for the bench's parser.
        let sites = adapter.layers.isEmpty ? adapter.modules.count : adapter.layers.count
        print("adapter    \(adapter.config.peftType) on \(sites) layers, \(training.trainableParameters) trainable parameters")
        print(String(format: "data       %d train / %d %@ examples, %.1f tokens per example (packed, no padding)",
                     trainSet.count, testSet.count, evalName, Double(tokens) / Double(max(trainSet.count, 1))))
        if rank0, initialEval { report("before", try training.evaluate(testSet), evalName) }
        let printer = rank0 ? ProgressPrinter() : nil
        let trainStart = Date()
        let startStep = trainer.globalStep
        var saveError: Error?
        do {
            try training.train(trainSet) { p in
                printer?.update(p)
                // What the hooks changed (rank growth) goes into the training log as it happens.
                for hook in training.trainer.adapter.trainingHooks { for line in hook.takeLogLines() where rank0 { print("hook       \(line)") } }
                guard rank0, let checkpoint, p.step == p.totalSteps || (checkpoint.every > 0 && p.step % checkpoint.every == 0) else { return true }
                do { try trainer.saveCheckpoint(directory: checkpoint.directory) } catch { saveError = error; return false }
                return true
            }
        } catch let error as GraftError where error.code == .cancelled && saveError != nil {
            throw saveError ?? error
        }
        let trainTime = Date().timeIntervalSince(trainStart)
        if rank0, let checkpoint { print("checkpoint \(checkpoint.directory) at step \(trainer.globalStep)") }
        ScaleOut.report(group: trainer.processGroup, steps: trainer.globalStep - startStep, trainSeconds: trainTime)
        guard rank0 else { return }
        session.adapted.resetRouterStatistics()
        report("after", try training.evaluate(testSet), evalName)
        if showReport {
            for hook in training.trainer.adapter.trainingHooks { for line in hook.reportLines() { print("report     \(line)") } }
        }
        // Expert mixtures: how the routers spread the test tokens (load per expert, entropy, capacity overflow).
        for (_, st) in session.adapted.routerStatistics() {
            print("router     \(st.path): load [\(st.load.map { String(format: "%.2f", $0) }.joined(separator: " "))], "
                  + String(format: "entropy %.2f nats, overflow %d", st.meanEntropy, st.overflowCount))
        }
        let epochsRun = Double(trainer.microStep) / Double(max(trainer.batchesPerEpoch(trainSet.count), 1))
        print(String(format: "time       %.1f s training (%.0f tokens/s), %.1f s in all", trainTime,
                     Double(tokens) * epochsRun / trainTime, Date().timeIntervalSince(start)))
        if let output {
            try session.saveAdapter("default", directory: output)
            let labels = session.classNames.map { " + \(ClassLabelFile.fileName) (\($0.joined(separator: ", ")))" } ?? ""
            let peft = PEFTParity.record(for: adapter.config.peftType) == .noPEFTCounterpart
                ? "Graft's own type, PEFT's file layout" : "loadable by PEFT"
            print("saved      \(output) (adapter_config.json + adapter_model.safetensors\(labels), \(peft))")
        }
    }

    private func report(_ when: String, _ m: EvaluationMetrics, _ evalName: String) {
        let label = when.padding(toLength: 10, withPad: " ", startingAt: 0)
        if training.session.task == .sequenceClassification {
            print(String(format: "%@ %@ accuracy %.3f, loss %.4f", label, evalName, m.accuracy, m.loss))
        } else {
            print(String(format: "%@ %@ loss %.4f, perplexity %.2f, next-token accuracy %.3f", label, evalName, m.loss, m.perplexity, m.accuracy))
        }
    }
}
