import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads Dr.LLM routers; the decoder itself is not saved (the routers retrofit a frozen base).
///
/// A saved directory holds:
/// - `drllm_config.json`: `{"format": "graft-drllm", "version": 1, "layers": L, "hidden_size": h,
///   "bottleneck": b, "windows": W, "actions": ["skip", "execute", "twice"]}` plus informational fields;
/// - `drllm_routers.safetensors`: per layer `i`, `model.layers.i.router.fc1.weight` F32 `[b, h]`,
///   `model.layers.i.router.fc1.bias` F32 `[b]`, `model.layers.i.router.fc2.weight` F32 `[3, b]` and
///   `model.layers.i.router.fc2.bias` F32 `[3]` (logits in the order of `actions`);
/// - the `graft_manifest.json` every Graft save writes (kind `drllm-routers`).
public enum DrLLMFormat {
    /// The config file's name.
    public static let configName = "drllm_config.json"
    /// The tensor file's name.
    public static let tensorsName = "drllm_routers.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-drllm"

    /// Saves `routing`'s routers for `model` into `directory`; `extra` adds informational config fields.
    public static func save(_ routing: DrLLMRouting, model: LlamaModel, to directory: String, extra: [String: Any] = [:]) throws {
        guard routing.routers.count == model.layers.count, let first = routing.routers.first else {
            throw GraftError.invalid("Dr.LLM: \(routing.routers.count) routers for \(model.layers.count) layers")
        }
        var writer = SafeTensorsWriter()
        for (i, r) in routing.routers.enumerated() {
            let p = "model.layers.\(i).router."
            try writer.add(p + "fc1.weight", r.fc1Weight)
            try writer.add(p + "fc1.bias", r.fc1Bias)
            try writer.add(p + "fc2.weight", r.fc2Weight)
            try writer.add(p + "fc2.bias", r.fc2Bias)
        }
        var config = extra
        config.merge(["format": formatName, "version": 1, "layers": model.layers.count,
                      "hidden_size": model.config.hiddenSize, "bottleneck": first.bottleneck, "windows": routing.windows,
                      "actions": ["skip", "execute", "twice"]]) { _, new in new }
        let json = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        try AtomicDirectory.write(directory: directory, kind: "drllm-routers",
                                  files: [(configName, [UInt8](json)), (tensorsName, writer.serialized())])
    }

    /// The routing saved in `directory` for `model`, validated against it (the file and field at fault are
    /// named); install it as `model.depthPolicy` to use it.
    public static func load(for model: LlamaModel, from directory: String) throws -> DrLLMRouting {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        let b = try config.int("bottleneck"), windows = try config.int("windows"), h = model.config.hiddenSize
        guard (1...(1 << 16)).contains(b) else { throw GraftError.format("\(configPath): field 'bottleneck' is \(b), expected 1...65536") }
        guard (1...(1 << 16)).contains(windows) else { throw GraftError.format("\(configPath): field 'windows' is \(windows), expected 1...65536") }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        func tensor(_ name: String, _ shape: [Int]) throws -> Tensor {
            try RoutingFiles.tensor(file, path: tensorsPath, name, shape)
        }
        let routers = try (0..<model.layers.count).map { i in
            let p = "model.layers.\(i).router."
            return try DrLLMRouter(path: "model.layers.\(i).router", fc1Weight: tensor(p + "fc1.weight", [b, h]),
                                   fc1Bias: tensor(p + "fc1.bias", [b]), fc2Weight: tensor(p + "fc2.weight", [3, b]),
                                   fc2Bias: tensor(p + "fc2.bias", [3]))
        }
        return try DrLLMRouting(routers: routers, windows: windows)
    }
}
