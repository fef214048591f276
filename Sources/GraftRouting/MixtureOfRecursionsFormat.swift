import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads a Mixture-of-Recursions routing; the decoder is not saved (the block is its own layers).
///
/// A saved directory holds:
/// - `recursion_config.json`: `{"format": "graft-mixture-of-recursions", "version": 1, "layers": L,
///   "hidden_size": h, "block_start": s, "block_end": e, "suffix_start": u, "max_recursions": N,
///   "routing": "token-choice", "gate": "straightThrough" | "probability", "kv_policy": "recursion-wise"}`, with
///   recursion LoRAs also `"lora_rank": r, "lora_scale": alpha / r, "lora_targets": ["o_proj", ...]`, plus
///   informational fields;
/// - `recursion_router.safetensors`: `model.recursion.router.weight` F32 `[N, h]` and
///   `model.recursion.router.bias` F32 `[N]` (logit `j` is depth `j + 1`), and per adapted projection and
///   recursion `r` in `1..<N` `<projection path>.recursion_lora.r.lora_A` F32 `[rank, in]` and `.lora_B` `[out, rank]`;
/// - the `graft_manifest.json` every Graft save writes (kind `mixture-of-recursions`).
public enum MixtureOfRecursionsFormat {
    /// The config file's name.
    public static let configName = "recursion_config.json"
    /// The tensor file's name.
    public static let tensorsName = "recursion_router.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-mixture-of-recursions"

    /// Saves `routing` (made for `model`) into `directory`; `extra` adds informational config fields.
    public static func save(_ routing: MixtureOfRecursions, model: LlamaModel, to directory: String,
                            extra: [String: Any] = [:]) throws {
        var writer = SafeTensorsWriter()
        try writer.add("model.recursion.router.weight", routing.routerWeight)
        try writer.add("model.recursion.router.bias", routing.routerBias)
        for adapter in routing.recursionAdapters {
            for (r, (a, b)) in zip(adapter.loraA, adapter.loraB).enumerated() {
                try writer.add("\(adapter.path).recursion_lora.\(r + 1).lora_A", a)
                try writer.add("\(adapter.path).recursion_lora.\(r + 1).lora_B", b)
            }
        }
        var config = extra
        if let first = routing.recursionAdapters.first {
            config["lora_rank"] = first.loraA.first?.shape[0] ?? 0
            config["lora_scale"] = Double(first.scale)
            config["lora_targets"] = routing.recursionLoRATargets
        }
        config.merge(["format": formatName, "version": 1, "layers": model.layers.count,
                      "hidden_size": model.config.hiddenSize, "block_start": routing.blockStart,
                      "block_end": routing.blockEnd, "suffix_start": routing.suffixStart,
                      "max_recursions": routing.maxRecursions, "routing": "token-choice",
                      "gate": routing.gate.rawValue, "kv_policy": "recursion-wise"]) { _, new in new }
        let json = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        try AtomicDirectory.write(directory: directory, kind: "mixture-of-recursions",
                                  files: [(configName, [UInt8](json)), (tensorsName, writer.serialized())])
    }

    /// The routing saved in `directory`, validated against `model` (the file and field at fault are named);
    /// install it as `model.depthPolicy` to use it.
    public static func load(for model: LlamaModel, from directory: String) throws -> MixtureOfRecursions {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        let start = try config.int("block_start"), end = try config.int("block_end"), suffix = try config.int("suffix_start")
        guard 0 <= start, start < end, end <= suffix, suffix <= model.layers.count else {
            throw GraftError.format("\(configPath): fields 'block_start' \(start), 'block_end' \(end), 'suffix_start' \(suffix) must satisfy 0 ≤ start < end ≤ suffix ≤ \(model.layers.count)")
        }
        let n = try config.int("max_recursions"), h = model.config.hiddenSize
        guard (1...64).contains(n) else { throw GraftError.format("\(configPath): field 'max_recursions' is \(n), expected 1...64") }
        let gateName = try config.string("gate") ?? RecursionGate.straightThrough.rawValue
        guard let gate = RecursionGate(rawValue: gateName) else {
            throw GraftError.format("\(configPath): field 'gate' is '\(gateName)', expected one of \(RecursionGate.allCases.map(\.rawValue))")
        }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        func tensor(_ name: String, _ shape: [Int]) throws -> Tensor {
            try RoutingFiles.tensor(file, path: tensorsPath, name, shape)
        }
        let routing = try MixtureOfRecursions(blockStart: start, blockEnd: end, suffixStart: suffix,
                                              routerWeight: tensor("model.recursion.router.weight", [n, h]),
                                              routerBias: tensor("model.recursion.router.bias", [n]))
        routing.gate = gate
        let rank = try config.int("lora_rank", default: 0)
        if rank > 0, n > 1 {
            guard let targets = config.object["lora_targets"] as? [String], !targets.isEmpty else {
                throw GraftError.format("\(configPath): field 'lora_targets' must list the projections the recursion LoRAs adapt")
            }
            let scale = try config.double("lora_scale")
            guard scale.isFinite else { throw GraftError.format("\(configPath): field 'lora_scale' must be finite") }
            try routing.addRecursionLoRA(model: model, rank: rank, alpha: Float(scale) * Float(rank), targets: targets)
            for adapter in routing.recursionAdapters {
                for r in 0..<adapter.loraA.count {
                    let p = "\(adapter.path).recursion_lora.\(r + 1)."
                    for (target, name) in [(adapter.loraA[r], "lora_A"), (adapter.loraB[r], "lora_B")] {
                        let saved = try tensor(p + name, target.shape)
                        withExtendedLifetime(saved) { target.pointer.update(from: saved.pointer, count: target.count) }
                    }
                }
            }
        }
        return routing
    }
}
