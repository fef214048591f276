import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// How an MoE base was made from its dense decoder (the `method` of a saved one).
public enum MoEBaseMethod: String, Sendable, CaseIterable {
    /// MoEfication: equal experts over a partition of the FFN's neurons.
    case moefication
    /// HMoE: experts of different sizes over a partition of the FFN's neurons.
    case hmoe
    /// Sparse upcycling: every expert starts as a copy of the FFN, then trains.
    case upcycling
}

/// Saves and loads an MoE base's partition and routers, so a dense decoder is made an MoE base again without
/// re-clustering. MoEfication's and HMoE's expert weights are not saved: they are the dense model's own, re-sliced
/// at load; upcycled experts, which train, are.
///
/// A saved directory holds:
/// - `moe_config.json`: `{"format": "graft-moe-base", "version": 2, "method": "moefication" | "hmoe" |
///   "upcycling", "experts": E, "top_k": k, "layers": L, "hidden_size": h, "intermediate_size": ff,
///   "router": "linear", "combine": "sum" | "probability" | "normalized_probability", "moe_layers": [i, ...],
///   "expert_sizes": [s₀, ...]}` plus optional `top_p` and informational fields (`seed`, `calibration_tokens`,
///   `base_model`). Version 1 (every layer, equal experts, no `method`) still loads;
/// - `moe_routers.safetensors`: per MoE layer `i`, `model.layers.i.mlp.router.weight` F32 `[E, h]`,
///   `model.layers.i.mlp.router.bias` F32 `[E]` and `model.layers.i.mlp.partition` I64 `[Σ sizes]` (the dense
///   block's neuron indices in expert order: expert `e` owns the `sizes[e]` entries after those of the experts
///   before it); for upcycling also `model.layers.i.mlp.experts.gate_proj` and `.up_proj` F32 `[E, m, h]` and
///   `.down_proj` F32 `[E, h, m]` (`m` the largest size);
/// - the `graft_manifest.json` every Graft save writes (kind `moe-base`).
public enum MoEBaseFormat {
    /// The config file's name.
    public static let configName = "moe_config.json"
    /// The tensor file's name.
    public static let tensorsName = "moe_routers.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-moe-base"

    /// Saves the MoE blocks of `model` (made by `method`; all with the same experts) into `directory`; `extra`
    /// adds informational config fields (JSON values).
    public static func save(model: LlamaModel, to directory: String, method: MoEBaseMethod = .moefication,
                            extra: [String: Any] = [:]) throws {
        let placed = model.layers.enumerated().compactMap { i, l in (l.feedForwardOverride as? MoEFeedForward).map { (i, $0) } }
        guard let first = placed.first?.1 else { throw GraftError.invalid("the model has no MoE block to save") }
        var writer = SafeTensorsWriter()
        for (i, b) in placed {
            guard b.expertLayers == nil else {
                throw GraftError(.state, "layer \(i) reuses other layers' experts; save the MoE base before ExpertReuse.apply and the reuse with ExpertReuseFormat")
            }
            guard b.experts == first.experts, b.expertSizes == first.expertSizes else {
                throw GraftError.invalid("layer \(i) has experts of sizes \(b.expertSizes), layer \(placed[0].0) has \(first.expertSizes); a saved MoE base has one expert layout")
            }
            let p = "model.layers.\(i).mlp."
            try writer.add(p + "router.weight", b.routerWeight)
            try writer.add(p + "router.bias", b.routerBias)
            try writer.add(p + "partition", int64s: b.partition.map(Int64.init), shape: [b.partition.count])
            if method == .upcycling {
                try writer.add(p + "experts.gate_proj", b.gateWeight)
                try writer.add(p + "experts.up_proj", b.upWeight)
                try writer.add(p + "experts.down_proj", b.downWeight)
            }
        }
        var config: [String: Any] = extra
        config.merge(["format": formatName, "version": 2, "method": method.rawValue, "experts": first.experts,
                      "top_k": first.topK, "layers": model.layers.count, "hidden_size": model.config.hiddenSize,
                      "intermediate_size": model.config.intermediateSize, "router": "linear",
                      "combine": first.combine.rawValue, "moe_layers": placed.map(\.0),
                      "expert_sizes": first.expertSizes]) { _, new in new }
        if let topP = first.topP { config["top_p"] = Double(topP) }
        let json = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        try AtomicDirectory.write(directory: directory, kind: "moe-base",
                                  files: [(configName, [UInt8](json)), (tensorsName, writer.serialized())])
    }

    /// Makes `model` (the dense decoder the directory was made from) the saved MoE base: each saved layer gets its
    /// MoE block with the saved partition and router (and, upcycled, experts); `topK` overrides the saved `k`.
    /// Validates the config and every tensor against the model and names the file and field at fault.
    public static func load(into model: LlamaModel, from directory: String, topK: Int? = nil) throws {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        guard try config.string("format") == formatName else {
            throw GraftError.format("\(configPath): field 'format' must be '\(formatName)'")
        }
        let version = try config.int("version")
        guard version == 1 || version == 2 else { throw GraftError.format("\(configPath): field 'version' is \(version); this Graft reads 1 and 2") }
        let experts = try config.int("experts"), layers = try config.int("layers")
        for (key, expected) in [("layers", model.layers.count), ("hidden_size", model.config.hiddenSize),
                                ("intermediate_size", model.config.intermediateSize)] {
            let v = try config.int(key)
            guard v == expected else { throw GraftError.format("\(configPath): field '\(key)' is \(v), the model has \(expected)") }
        }
        let ff = model.config.intermediateSize, h = model.config.hiddenSize
        let methodName = try config.string("method") ?? MoEBaseMethod.moefication.rawValue
        guard let method = MoEBaseMethod(rawValue: methodName) else {
            throw GraftError.format("\(configPath): field 'method' is '\(methodName)', expected one of \(MoEBaseMethod.allCases.map(\.rawValue))")
        }
        guard experts >= 1 else { throw GraftError.format("\(configPath): field 'experts' is \(experts), expected ≥ 1") }
        let sizes = try config.ints("expert_sizes") ?? {
            guard ff % experts == 0 else {
                throw GraftError.format("\(configPath): field 'experts' is \(experts), which does not divide \(ff)")
            }
            return [Int](repeating: method == .upcycling ? ff : ff / experts, count: experts)
        }()
        guard sizes.count == experts, sizes.allSatisfy({ (1...ff).contains($0) }),
              method == .upcycling ? sizes.allSatisfy({ $0 == ff }) : sizes.reduce(0, +) == ff else {
            throw GraftError.format("\(configPath): field 'expert_sizes' \(sizes) must hold \(experts) sizes that \(method == .upcycling ? "each equal" : "sum to") the intermediate size \(ff)")
        }
        let moeLayers = try config.ints("moe_layers") ?? Array(0..<layers)
        guard !moeLayers.isEmpty, moeLayers.allSatisfy({ (0..<layers).contains($0) }), Set(moeLayers).count == moeLayers.count else {
            throw GraftError.format("\(configPath): field 'moe_layers' \(moeLayers) must list distinct layers in 0..<\(layers)")
        }
        let k = try topK ?? config.int("top_k")
        guard (1...experts).contains(k) else { throw GraftError.invalid("\(configPath): top_k \(k) must be in 1...\(experts)") }
        let topP = try config.double("top_p", default: .nan)
        guard topP.isNaN || (topP > 0 && topP <= 1) else { throw GraftError.format("\(configPath): field 'top_p' is \(topP), expected a value in (0, 1]") }
        let combineName = try config.string("combine") ?? MoECombine.sum.rawValue
        guard let combine = MoECombine(rawValue: combineName) else {
            throw GraftError.format("\(configPath): field 'combine' is '\(combineName)', expected one of \(MoECombine.allCases.map(\.rawValue))")
        }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        func tensor(_ name: String, _ shape: [Int]) throws -> Tensor {
            try RoutingFiles.tensor(file, path: tensorsPath, name, shape)
        }
        let m = sizes.max() ?? 0, total = sizes.reduce(0, +)
        var blocks: [(Int, MoEFeedForward)] = []
        for i in moeLayers {
            let p = "model.layers.\(i).mlp."
            guard file.contains(p + "partition") else { throw GraftError.format("\(tensorsPath): tensor '\(p)partition' is missing") }
            let raw = try file.int64s(p + "partition")
            guard raw.count == total, raw.allSatisfy({ $0 >= 0 && $0 < Int64(ff) }) else {
                throw GraftError.format("\(tensorsPath): tensor '\(p)partition' must hold \(total) indices in 0..<\(ff)")
            }
            let partition = raw.map { Int32($0) }
            let what = "\(tensorsPath): '\(p)partition'"
            if method == .upcycling {
                _ = try MoEPartition.validateSpans(partition, sizes: sizes, what: what)
            } else {
                try MoEPartition.validate(partition, neurons: ff, what: what)
            }
            let (gate, up, down) = method == .upcycling
                ? (try tensor(p + "experts.gate_proj", [experts, m, h]), try tensor(p + "experts.up_proj", [experts, m, h]),
                   try tensor(p + "experts.down_proj", [experts, h, m]))
                : MoEfication.expertWeights(layer: model.layers[i], partition: partition, sizes: sizes)
            let block = try MoEFeedForward(path: "model.layers.\(i).mlp", partition: partition, gate: gate, up: up, down: down,
                                           routerWeight: try tensor(p + "router.weight", [experts, h]),
                                           routerBias: try tensor(p + "router.bias", [experts]), topK: k, expertSizes: sizes)
            block.combine = combine
            block.topP = topP.isNaN ? nil : Float(topP)
            blocks.append((i, block))
        }
        try model.checkNoFeedForwardAdapters()
        model.removeMoEBlocks()
        for (i, block) in blocks { model.layers[i].feedForwardOverride = block }
    }
}
