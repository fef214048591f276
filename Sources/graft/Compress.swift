import ArgumentParser
import Foundation
import Graft
import GraftAssets

/// `graft compress`: stores a PEFT adapter directory compressed (ComPEFT or 1-bit), reports the sizes, and with
/// `--eval-data` loads the compressed directory back and compares its accuracy with the float32 adapter's.
struct Compress: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compress an adapter (ComPEFT or 1-bit), report its size, and optionally its accuracy after loading it back.",
        discussion: """
            The output directory holds PEFT's adapter_config.json and the packed file; every door's adapter loading \
            (graft_adapter_load, Python's load_adapter, Lua, graftd) reads it back as a working adapter. Example:
              graft compress out/demo-adapter --method compeft --density 0.1 --output out/demo-compeft --eval-data tweets
            """)

    @Argument(help: "PEFT adapter directory.")
    var adapter: String
    @Option(help: "compeft (top-density entries as α·σ·sign) or onebit (sign bits + a scale per row group).")
    var method: String = "compeft"
    @Option(help: "ComPEFT: fraction of each tensor's entries kept (default 0.1).")
    var density: Double?
    @Option(help: "ComPEFT: the scale α of α·σ·sign (default 1).")
    var alpha: Double?
    @Option(help: "Directory to write the compressed adapter to.")
    var output: String
    @Option(help: "Evaluate the float32 and the reloaded compressed adapter on this data: a JSONL file or 'tweets' (the demo's test split).")
    var evalData: String?
    @Option(help: "Base model (default: the adapter's base_model_name_or_path).")
    var model: String?
    @Option(help: "Model task: base, seq-cls or causal-lm (default: the adapter's task_type, else base).")
    var task: String?
    @Option(help: "Number of labels of a seq-cls head.")
    var numLabels: Int = 3
    @Option(help: "Seed of the model's head (a seq-cls adapter without modules_to_save reads through the head this seed draws).")
    var seed: UInt64?

    func run() throws {
        try graft.run {
            let kind = try AdapterCompressionMethod(name: method)
            let recorded = try Merge.recordedBase(adapter)
            let taskName = task ?? recorded.task ?? "base"
            guard let sessionTask = SessionTask(name: taskName) else {
                throw GraftError.invalid("--task '\(taskName)' is not one of: \(SessionTask.aliasList)")
            }
            guard let modelName = model ?? recorded.model else {
                throw GraftError.invalid("\(adapter)/adapter_config.json names no base model Graft has (base_model_name_or_path); pass --model")
            }
            var modelOptions = ModelOptions()
            modelOptions.task = sessionTask
            modelOptions.numLabels = numLabels
            if let seed { modelOptions.seed = seed }
            try modelOptions.validate()
            let session = try AssetCache.openSession(modelName, options: modelOptions)
            try session.loadAdapter(directory: adapter, name: "original")
            var options: [String: Any] = [:]
            if let density { options["density"] = density }
            if let alpha { options["alpha"] = alpha }
            let json = try session.compressAdapter(name: "original", method: kind, directory: output,
                                                   optionsJSON: options.isEmpty ? nil : try GraftSession.jsonString(options))
            let report = (try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any] ?? [:]
            let fileBytes = (report["file_bytes"] as? NSNumber)?.intValue ?? 0
            let float32File = (try? FileManager.default.attributesOfItem(atPath: adapter + "/adapter_model.safetensors"))?[.size] as? NSNumber
            var line = "compressed \(adapter) → \(output) (\(kind.rawValue)): \(fileBytes) bytes"
            if let f = float32File?.intValue, fileBytes > 0 {
                line += String(format: " vs %d bytes of adapter_model.safetensors (%.1fx smaller)", f, Double(f) / Double(fileBytes))
            }
            if let kept = report["kept_fraction"] as? Double { line += String(format: ", %.4f of entries kept", kept) }
            print(line)
            guard let evalData else { return }
            try session.loadAdapter(directory: output, name: "compressed")
            let test = try Self.evaluationData(evalData, task: sessionTask)
            for name in ["original", "compressed"] {
                let t = try GraftTrainingSession(session: session, adapterName: name, options: Graft.TrainingOptions())
                let examples = try evalData == AssetCache.tweetsDataName ? t.tokenize(test) : t.loadExamples(evalData)
                let m = try t.evaluate(examples)
                t.release()
                let label = name == "original" ? "float32   " : "\(kind.rawValue) (reloaded from \(output))"
                print(String(format: "accuracy   %@: %.4f on %d examples (loss %.4f)", label, m.accuracy, examples.count, m.loss))
            }
        }
    }

    /// The tweets' demo test split for `task`, or an empty placeholder for a JSONL file (loaded per trainer).
    static func evaluationData(_ name: String, task: SessionTask) throws -> TextData {
        guard name == AssetCache.tweetsDataName else { return .labeled([]) }
        return try AssetCache.tweets(for: task).test
    }
}
