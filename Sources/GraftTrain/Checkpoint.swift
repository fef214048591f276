import Foundation
import GraftAdapters
import GraftIO
import GraftTensor

extension Trainer {
    /// The files of a checkpoint directory besides ``AtomicDirectory/manifestName``.
    static let checkpointFiles = ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                                  "trainer_state.json"]

    /// Writes a checkpoint directory: the adapter in PEFT format, the optimizer state, the trainer state
    /// (steps and RNG) and a manifest of the files' sizes and SHA-256s (kind `"checkpoint"`, metadata
    /// `global_step`).
    ///
    /// The save is crash-safe (``AtomicDirectory``): in a directory of its own the checkpoint is staged beside
    /// it, fsynced and swapped in atomically, so a process killed at any moment leaves the previous checkpoint
    /// or the new one, never a mix. Throws ``GraftError`` `.io` naming the path and the step that failed.
    public func saveCheckpoint(directory: String) throws {
        var files = try model.adapterFiles(adapter.name)
        var writer = SafeTensorsWriter()
        writer.metadata = ["format": "graft-optimizer", "optimizer": config.optimizer.rawValue]
        for (key, values) in optimizer.stateDict().sorted(by: { $0.key < $1.key }) {
            try writer.add(key, Tensor(shape: [values.count], values: values))
        }
        files.append(("optimizer.safetensors", writer.serialized()))
        let state: [String: Any] = [
            "global_step": globalStep,
            "micro_step": microStep,
            "dropout_rng": adapter.state.rng.stateWords.map { String($0) },
            "seed": String(config.seed),
            "optimizer": config.optimizer.rawValue,
            // Examples per global micro-batch: micro_step counts these, so a resume must keep it (any rank count).
            "global_batch_size": globalBatchSize,
        ]
        let json = try JSONSerialization.data(withJSONObject: state, options: [.prettyPrinted, .sortedKeys])
        files.append(("trainer_state.json", [UInt8](json)))
        try AtomicDirectory.write(directory: directory, kind: "checkpoint", files: files,
                                  metadata: ["global_step": String(globalStep)])
    }

    /// Restores a checkpoint written by ``saveCheckpoint(directory:)``: adapter weights, optimizer state,
    /// step counters and RNG, so training continues exactly where it stopped.
    ///
    /// Every file is checked against the checkpoint's manifest before anything is restored: a directory
    /// without one, or whose files do not match it (a mix of two saves), is a `.format` error naming the
    /// file at fault, raised with the trainer untouched. `.notFound` when `directory` does not exist,
    /// `.invalidArgument` for a checkpoint of another optimizer.
    public func loadCheckpoint(directory: String) throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw GraftError(.notFound, "\(directory): no such checkpoint directory")
        }
        let saved = try SavedDirectory(path: directory)
        let manifestPath = directory + "/" + AtomicDirectory.manifestName
        guard let manifest = saved.manifest else {
            throw GraftError.format("\(manifestPath): missing, so '\(directory)' is not a complete Graft checkpoint (an unfinished save, a checkpoint from a Graft before manifests, or not a checkpoint directory)")
        }
        guard manifest.kind == "checkpoint" else {
            throw GraftError.format("\(manifestPath): the directory holds a saved \(manifest.kind), not a checkpoint")
        }
        if let absent = Trainer.checkpointFiles.first(where: { manifest.files[$0] == nil }) {
            throw GraftError.format("\(manifestPath): lists no '\(absent)', which a checkpoint needs")
        }
        let path = directory + "/trainer_state.json"
        guard let object = (try? JSONSerialization.jsonObject(with: Data(try saved.contents("trainer_state.json")))) as? [String: Any] else {
            throw GraftError.format("\(path): not a JSON object")
        }
        guard let step = object["global_step"] as? Int, let micro = object["micro_step"] as? Int,
              let rng = object["dropout_rng"] as? [String], rng.count == 4 else {
            throw GraftError.format("\(path): needs integer 'global_step', 'micro_step' and a 4-word 'dropout_rng'")
        }
        let words = rng.compactMap { UInt64($0) }
        guard words.count == 4 else { throw GraftError.format("\(path): 'dropout_rng' words must be unsigned integers") }
        if let kind = object["optimizer"] as? String, kind != config.optimizer.rawValue {
            throw GraftError.invalid("\(path): checkpoint was written by \(kind), this trainer uses \(config.optimizer.rawValue)")
        }
        if let global = object["global_batch_size"] as? Int, global != globalBatchSize {
            throw GraftError.invalid("\(path): the checkpoint was written with a global batch of \(global) examples (ranks × batch size), this run has \(globalBatchSize) (\(processGroup.size) rank(s) × \(config.batchSize)); keep ranks × batch size equal to resume")
        }
        if let recorded = manifest.metadata["global_step"], recorded != String(step) {
            throw GraftError.format("\(path): 'global_step' \(step) disagrees with \(manifestPath) (\(recorded))")
        }
        let weights = try saved.safeTensors("adapter_model.safetensors")
        let opt = try saved.safeTensors("optimizer.safetensors")
        var state: [String: [Float]] = [:]
        for name in opt.names { state[name] = try opt.tensor(name).scalars }
        if adapter.pendingDataInitialization != nil, microStep == 0 {
            try reshapeToCheckpoint(saved, directory: directory)
        }
        try model.loadWeights(weights, into: adapter)
        try optimizer.loadStateDict(state)
        globalStep = step
        microStep = micro
        adapter.state.rng = GraftRNG(state: words)
    }

    /// A fresh run's adapter added with a data-driven `init_lora_weights` still has the shape its config asks for,
    /// but the checkpoint holds the initialized adapter, whose shape the data decided (EVA's `rank_pattern`):
    /// rebuilds the adapter from the checkpoint's config so its weights fit. Nothing changes when the configs'
    /// shapes agree (LoRA-GA, CorDA, or EVA without redistribution).
    func reshapeToCheckpoint(_ saved: SavedDirectory, directory: String) throws {
        let path = directory + "/adapter_config.json"
        guard let json = (try? JSONSerialization.jsonObject(with: Data(try saved.contents("adapter_config.json")))) as? [String: Any] else {
            throw GraftError.format("\(path): not a JSON object")
        }
        let shapeKeys = ["target_modules", "rank_pattern", "alpha_pattern", "r", "lora_alpha"]
        let current = adapter.config.json
        let same = shapeKeys.allSatisfy { key in
            NSDictionary(dictionary: [key: current[key] ?? NSNull()]).isEqual(to: [key: json[key] ?? NSNull()])
        }
        guard !same else { return }
        let name = adapter.name, previous = adapter.config
        let config = try AdapterConfig(json: json, source: path)
        try model.deleteAdapter(name)
        do {
            _ = try model.addAdapter(name, config: config)
        } catch {
            _ = try? model.addAdapter(name, config: previous)
            try? rebindAdapter()
            throw error
        }
        try rebindAdapter()
    }
}
