import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads a ``WideNet`` made from a dense decoder: the shared routers, the grouped layers' norms (which
/// training tunes) and, when they were trained, the shared experts; the dense model supplies the rest.
///
/// A saved directory holds:
/// - `widenet_config.json`: `{"format": "graft-widenet", "version": 1, "layers": L, "hidden_size": h,
///   "groups": [[i, i+1, …], …], "top_k": k, "experts_saved": bool}` plus informational fields;
/// - `widenet.safetensors`: per group (named by its first layer `i`) `widenet.i.router.weight` F32 `[g, h]`,
///   `widenet.i.router.bias` F32 `[g]`, with `experts_saved` also `widenet.i.experts.{gate_proj,up_proj}`
///   `[g, ff, h]` and `widenet.i.experts.down_proj` `[g, h, ff]`; per grouped layer `model.layers.j.input_layernorm.weight`
///   and `model.layers.j.post_attention_layernorm.weight` F32 `[h]`;
/// - the `graft_manifest.json` every Graft save writes (kind `widenet`).
public enum WideNetFormat {
    /// The config file's name.
    public static let configName = "widenet_config.json"
    /// The tensor file's name.
    public static let tensorsName = "widenet.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-widenet"

    /// Saves `model`'s WideNet into `directory` (its experts too when `experts`); `extra` adds informational fields.
    public static func save(model: LlamaModel, to directory: String, experts: Bool = false, extra: [String: Any] = [:]) throws {
        let blocks = WideNet.blocks(of: model)
        var groups: [[Int]] = [], topK = 1
        var writer = SafeTensorsWriter()
        for (i, block) in blocks.enumerated() {
            guard let block, let group = block.sharedByLayers else { continue }
            let layer = model.layers[i]
            try writer.add("model.layers.\(i).input_layernorm.weight", layer.inputNorm.weight)
            try writer.add("model.layers.\(i).post_attention_layernorm.weight", layer.postAttentionNorm.weight)
            guard group.first == i else { continue }
            groups.append(group)
            topK = block.topK
            try writer.add("widenet.\(i).router.weight", block.routerWeight)
            try writer.add("widenet.\(i).router.bias", block.routerBias)
            if experts {
                try writer.add("widenet.\(i).experts.gate_proj", block.gateWeight)
                try writer.add("widenet.\(i).experts.up_proj", block.upWeight)
                try writer.add("widenet.\(i).experts.down_proj", block.downWeight)
            }
        }
        guard !groups.isEmpty else { throw GraftError(.state, "WideNet: the model has no shared MoE blocks; nothing to save") }
        try RoutingFiles.write(directory: directory, kind: "widenet", format: formatName, model: model, configName: configName,
                               fields: ["groups": groups, "top_k": topK, "experts_saved": experts], extra: extra,
                               tensorsName: tensorsName, writer: writer)
    }

    /// Makes the dense `model` the WideNet saved in `directory`; the file and field or tensor at fault are named,
    /// and on an error the model is unchanged.
    public static func load(into model: LlamaModel, from directory: String) throws {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        guard let raw = config.object["groups"] as? [[Any]] else {
            throw GraftError.format("\(configPath): field 'groups' must be a list of lists of layer indices")
        }
        let groups = try raw.map { try $0.map { v -> Int in
            guard let n = JSONScalar.integer(v) else { throw GraftError.format("\(configPath): field 'groups' holds \(JSONScalar.describe(v)), not a layer index") }
            return n
        } }
        let size = groups.first?.count ?? 0
        var options = WideNetOptions()
        options.groupSize = size
        options.layers = groups.flatMap { $0 }
        options.topK = try config.int("top_k")
        do {
            guard groups.allSatisfy({ $0.count == size }), try WideNet.layerGroups(count: model.layers.count, options: options) == groups else {
                throw GraftError.invalid("groups \(groups) are not consecutive groups of one size")
            }
        } catch let e as GraftError {
            throw GraftError.format("\(configPath): field 'groups' or 'top_k': \(e.message)")
        }
        guard let withExperts = (config.object["experts_saved"] ?? false) as? Bool else {
            throw GraftError.format("\(configPath): field 'experts_saved' must be true or false")
        }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        let h = model.config.hiddenSize, ff = model.config.intermediateSize
        let routers = try groups.map { g -> (Tensor, Tensor) in
            (try RoutingFiles.tensor(file, path: tensorsPath, "widenet.\(g[0]).router.weight", [g.count, h]),
             try RoutingFiles.tensor(file, path: tensorsPath, "widenet.\(g[0]).router.bias", [g.count]))
        }
        var norms: [(Tensor, Tensor)] = []
        for i in options.layers ?? [] {
            let layer = model.layers[i]
            norms.append((try RoutingFiles.tensor(file, path: tensorsPath, "model.layers.\(i).input_layernorm.weight", layer.inputNorm.weight.shape),
                          try RoutingFiles.tensor(file, path: tensorsPath, "model.layers.\(i).post_attention_layernorm.weight", layer.postAttentionNorm.weight.shape)))
        }
        var experts: [[Tensor]] = []
        if withExperts {
            experts = try groups.map { g in
                try [("gate_proj", [g.count, ff, h]), ("up_proj", [g.count, ff, h]), ("down_proj", [g.count, h, ff])].map {
                    try RoutingFiles.tensor(file, path: tensorsPath, "widenet.\(g[0]).experts.\($0.0)", $0.1)
                }
            }
        }
        // Everything is read and checked: now the model changes.
        try model.checkNoFeedForwardAdapters()
        model.removeMoEBlocks()
        try WideNet.install(on: model, groups: groups, routers: routers, topK: options.topK, balanceLossWeight: 0)
        for (i, (input, post)) in zip(options.layers ?? [], norms) {
            model.layers[i].inputNorm.weight.pointer.update(from: input.pointer, count: input.count)
            model.layers[i].postAttentionNorm.weight.pointer.update(from: post.pointer, count: post.count)
        }
        for (g, tensors) in zip(groups, experts) {
            guard let block = model.layers[g[0]].feedForwardOverride as? MoEFeedForward else { continue }
            for (t, saved) in zip([block.gateWeight, block.upWeight, block.downWeight], tensors) {
                t.pointer.update(from: saved.pointer, count: t.count)
            }
        }
    }
}
