import Foundation
import GraftAdapters
import GraftIO
import GraftTensor

extension Trainer {
    /// Writes a checkpoint directory: the adapter in PEFT format, the optimizer state, and the trainer state
    /// (steps and RNG), each file written to a temporary name, fsynced and renamed.
    public func saveCheckpoint(directory: String) throws {
        try model.saveAdapter(adapter.name, directory: directory)
        var writer = SafeTensorsWriter()
        writer.metadata = ["format": "graft-optimizer", "optimizer": config.optimizer.rawValue]
        for (key, values) in optimizer.stateDict().sorted(by: { $0.key < $1.key }) {
            try writer.add(key, Tensor(shape: [values.count], values: values))
        }
        try writer.write(to: directory + "/optimizer.safetensors")
        let state: [String: Any] = [
            "global_step": globalStep,
            "micro_step": microStep,
            "dropout_rng": adapter.state.rng.stateWords.map { String($0) },
            "seed": String(config.seed),
            "optimizer": config.optimizer.rawValue,
        ]
        let json = try JSONSerialization.data(withJSONObject: state, options: [.prettyPrinted, .sortedKeys])
        try AtomicFile.write(json, to: directory + "/trainer_state.json")
    }

    /// Restores a checkpoint written by ``saveCheckpoint(directory:)``: adapter weights, optimizer state,
    /// step counters and RNG, so training continues exactly where it stopped.
    public func loadCheckpoint(directory: String) throws {
        let weights = try SafeTensorsFile(contentsOf: directory + "/adapter_model.safetensors")
        try model.loadWeights(weights, into: adapter)
        let opt = try SafeTensorsFile(contentsOf: directory + "/optimizer.safetensors")
        var state: [String: [Float]] = [:]
        for name in opt.names { state[name] = try opt.tensor(name).scalars }
        try optimizer.loadStateDict(state)
        let path = directory + "/trainer_state.json"
        guard let data = FileManager.default.contents(atPath: path),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw GraftError.format("\(path): missing or not a JSON object")
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
        globalStep = step
        microStep = micro
        adapter.state.rng = GraftRNG(state: words)
    }
}
