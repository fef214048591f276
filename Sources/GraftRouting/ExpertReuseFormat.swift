import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads the routers of an MoE base whose layers reuse each other's experts (``ExpertReuse``); the MoE
/// base itself is saved apart (``MoEBaseFormat``), before the reuse.
///
/// A saved directory holds:
/// - `reuse_config.json`: `{"format": "graft-expert-reuse", "version": 1, "layers": L, "hidden_size": h,
///   "window": w (-1: every layer), "experts_per_layer": E, "combine": "probability" | ..., "borrowed_bias": b}`
///   plus informational fields;
/// - `reuse_routers.safetensors`: per layer `i`, `model.layers.i.mlp.router.weight` F32 `[P·E, h]` and
///   `.router.bias` F32 `[P·E]` over the experts of its `P` source layers in layer order;
/// - the `graft_manifest.json` every Graft save writes (kind `expert-reuse`).
public enum ExpertReuseFormat {
    /// The config file's name.
    public static let configName = "reuse_config.json"
    /// The tensor file's name.
    public static let tensorsName = "reuse_routers.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-expert-reuse"

    /// Saves the reuse routers of `model` (made by ``ExpertReuse/apply(to:options:)`` with `options`) into
    /// `directory`; `extra` adds informational config fields.
    public static func save(model: LlamaModel, options: ExpertReuseOptions, to directory: String, extra: [String: Any] = [:]) throws {
        let blocks = model.moeBlocks
        guard blocks.count == model.layers.count, blocks.allSatisfy({ $0.expertLayers != nil }), let first = blocks.first else {
            throw GraftError(.state, "expert reuse: the model's MoE blocks do not reuse experts; nothing to save")
        }
        var writer = SafeTensorsWriter()
        for b in blocks {
            try writer.add(b.path + ".router.weight", b.routerWeight)
            try writer.add(b.path + ".router.bias", b.routerBias)
        }
        let perLayer = first.experts / Set(first.expertLayers ?? []).count
        try RoutingFiles.write(directory: directory, kind: "expert-reuse", format: formatName, model: model, configName: configName,
                               fields: ["window": options.window ?? -1, "experts_per_layer": perLayer,
                                        "combine": options.combine.rawValue, "borrowed_bias": Double(options.borrowedBias)],
                               extra: extra, tensorsName: tensorsName, writer: writer)
    }

    /// Makes `model` (carrying the MoE base the reuse was made on) reuse experts as saved in `directory`; the
    /// file and field or tensor at fault are named, and on an error the model is unchanged.
    public static func load(into model: LlamaModel, from directory: String) throws {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        var options = ExpertReuseOptions()
        let window = try config.int("window")
        guard window >= -1 else { throw GraftError.format("\(configPath): field 'window' is \(window), expected ≥ 0 or -1 (every layer)") }
        options.window = window == -1 ? nil : window
        let combineName = try config.string("combine") ?? MoECombine.probability.rawValue
        guard let combine = MoECombine(rawValue: combineName) else {
            throw GraftError.format("\(configPath): field 'combine' is '\(combineName)', expected one of \(MoECombine.allCases.map(\.rawValue))")
        }
        options.combine = combine
        options.borrowedBias = Float(try config.double("borrowed_bias", default: 0))
        let perLayer = try config.int("experts_per_layer")
        guard let base = model.moeBlocks.first, base.expertLayers == nil, base.experts == perLayer else {
            throw GraftError.format("\(configPath): field 'experts_per_layer' is \(perLayer); the model must carry the MoE base it was made on (\(model.moeBlocks.first.map { "\($0.experts) experts" } ?? "no MoE block"))")
        }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        let saved = model.layers.map(\.feedForwardOverride)
        try ExpertReuse.apply(to: model, options: options)
        do {
            for b in model.moeBlocks {
                for (name, t) in [("router.weight", b.routerWeight), ("router.bias", b.routerBias)] {
                    let v = try RoutingFiles.tensor(file, path: tensorsPath, b.path + "." + name, t.shape)
                    t.pointer.update(from: v.pointer, count: t.count)
                }
            }
        } catch {
            for (layer, block) in zip(model.layers, saved) { layer.feedForwardOverride = block }
            throw error
        }
    }
}
