import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads an MoE base's partition and routers, so a dense decoder is made an MoE base again without
/// re-clustering. The expert weights are not saved: they are the dense model's own, re-sliced at load.
///
/// A saved directory holds:
/// - `moe_config.json`: `{"format": "graft-moe-base", "version": 1, "method": "moefication", "experts": E,
///   "top_k": k, "layers": L, "hidden_size": h, "intermediate_size": ff, "router": "linear", "combine": "sum"}`
///   plus informational fields (`seed`, `calibration_tokens`, `base_model`);
/// - `moe_routers.safetensors`: per layer `i`, `model.layers.i.mlp.router.weight` F32 `[E, h]`,
///   `model.layers.i.mlp.router.bias` F32 `[E]` and `model.layers.i.mlp.partition` I64 `[ff]` (the dense block's
///   neuron indices in expert order: expert `e` owns entries `e·ff/E ..< (e+1)·ff/E`);
/// - the `graft_manifest.json` every Graft save writes (kind `moe-base`).
public enum MoEBaseFormat {
    /// The config file's name.
    public static let configName = "moe_config.json"
    /// The tensor file's name.
    public static let tensorsName = "moe_routers.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-moe-base"

    /// Saves the MoE blocks of `model` (every layer must have one) into `directory`; `extra` adds informational
    /// config fields (JSON values).
    public static func save(model: LlamaModel, to directory: String, extra: [String: Any] = [:]) throws {
        let blocks = model.moeBlocks
        guard !blocks.isEmpty, blocks.count == model.layers.count, let first = blocks.first else {
            throw GraftError.invalid("the model has MoE blocks on \(blocks.count) of \(model.layers.count) layers; all are needed to save an MoE base")
        }
        var writer = SafeTensorsWriter()
        for (i, b) in blocks.enumerated() {
            guard b.experts == first.experts else { throw GraftError.invalid("layer \(i) has \(b.experts) experts, layer 0 has \(first.experts)") }
            let p = "model.layers.\(i).mlp."
            try writer.add(p + "router.weight", b.routerWeight)
            try writer.add(p + "router.bias", b.routerBias)
            try writer.add(p + "partition", int64s: b.partition.map(Int64.init), shape: [b.partition.count])
        }
        var config: [String: Any] = extra
        config.merge(["format": formatName, "version": 1, "method": "moefication", "experts": first.experts,
                      "top_k": first.topK, "layers": blocks.count, "hidden_size": model.config.hiddenSize,
                      "intermediate_size": model.config.intermediateSize, "router": "linear",
                      "combine": first.combine.rawValue]) { _, new in new }
        let json = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        try AtomicDirectory.write(directory: directory, kind: "moe-base",
                                  files: [(configName, [UInt8](json)), (tensorsName, writer.serialized())])
    }

    /// Makes `model` (the dense decoder the directory was made from) the saved MoE base: every layer gets its
    /// MoE block with the saved partition and router; `topK` overrides the saved `k`. Validates the config and
    /// every tensor against the model and names the file and field at fault.
    public static func load(into model: LlamaModel, from directory: String, topK: Int? = nil) throws {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        guard try config.string("format") == formatName else {
            throw GraftError.format("\(configPath): field 'format' must be '\(formatName)'")
        }
        guard try config.int("version") == 1 else { throw GraftError.format("\(configPath): field 'version' must be 1") }
        let experts = try config.int("experts"), layers = try config.int("layers")
        for (key, expected) in [("layers", model.layers.count), ("hidden_size", model.config.hiddenSize),
                                ("intermediate_size", model.config.intermediateSize)] {
            let v = try config.int(key)
            guard v == expected else { throw GraftError.format("\(configPath): field '\(key)' is \(v), the model has \(expected)") }
        }
        let ff = model.config.intermediateSize, h = model.config.hiddenSize
        guard experts >= 1, ff % experts == 0 else {
            throw GraftError.format("\(configPath): field 'experts' is \(experts), which does not divide \(ff)")
        }
        let k = try topK ?? config.int("top_k")
        guard (1...experts).contains(k) else { throw GraftError.invalid("\(configPath): top_k \(k) must be in 1...\(experts)") }
        let combineName = try config.string("combine") ?? MoECombine.sum.rawValue
        guard let combine = MoECombine(rawValue: combineName) else {
            throw GraftError.format("\(configPath): field 'combine' is '\(combineName)', expected one of \(MoECombine.allCases.map(\.rawValue))")
        }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        func tensor(_ name: String, _ shape: [Int]) throws -> Tensor {
            try RoutingFiles.tensor(file, path: tensorsPath, name, shape)
        }
        var blocks: [MoEFeedForward] = []
        for i in 0..<layers {
            let p = "model.layers.\(i).mlp."
            guard file.contains(p + "partition") else { throw GraftError.format("\(tensorsPath): tensor '\(p)partition' is missing") }
            let raw = try file.int64s(p + "partition")
            guard raw.count == ff, raw.allSatisfy({ $0 >= 0 && $0 < Int64(ff) }) else {
                throw GraftError.format("\(tensorsPath): tensor '\(p)partition' must hold \(ff) indices in 0..<\(ff)")
            }
            let partition = raw.map { Int32($0) }
            try MoEPartition.validate(partition, neurons: ff, what: "\(tensorsPath): '\(p)partition'")
            let (gate, up, down) = MoEfication.expertWeights(layer: model.layers[i], partition: partition, experts: experts)
            let block = try MoEFeedForward(path: "model.layers.\(i).mlp", partition: partition, gate: gate, up: up, down: down,
                                           routerWeight: try tensor(p + "router.weight", [experts, h]),
                                           routerBias: try tensor(p + "router.bias", [experts]), topK: k)
            block.combine = combine
            blocks.append(block)
        }
        try model.checkNoFeedForwardAdapters()
        for (layer, block) in zip(model.layers, blocks) { layer.feedForwardOverride = block }
    }
}
