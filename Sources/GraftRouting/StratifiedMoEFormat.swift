import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads the stratified MoE blocks of a decoder (``StratifiedMoE``); the dense model supplies the rest.
///
/// A saved directory holds:
/// - `stratified_config.json`: `{"format": "graft-stratified-moe", "version": 1, "layers": L, "hidden_size": h,
///   "moe_layers": [i, …], "strata": [E₀, E₁, …], "expert_sizes": [m_e, …], "expert_slice": m, "top_k": k,
///   "norm_eps": ε}` plus informational fields;
/// - `stratified.safetensors`: per stratified layer `i`, `model.layers.i.mlp.experts.{gate_proj,up_proj}` F32
///   `[E, m, h]`, `.experts.down_proj` `[E, h, m]`, `.strata.s.router.weight` `[E, h]`, `.strata.s.router.bias`
///   `[E]` and `.strata.s.norm.weight` `[h]` for `s ≥ 1`;
/// - the `graft_manifest.json` every Graft save writes (kind `stratified-moe`).
public enum StratifiedMoEFormat {
    /// The config file's name.
    public static let configName = "stratified_config.json"
    /// The tensor file's name.
    public static let tensorsName = "stratified.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-stratified-moe"

    /// Saves `model`'s stratified blocks into `directory`; `extra` adds informational fields.
    public static func save(model: LlamaModel, to directory: String, extra: [String: Any] = [:]) throws {
        let blocks = StratifiedMoE.blocks(of: model)
        guard let first = blocks.first else { throw GraftError(.state, "stratified MoE: the model has no stratified blocks; nothing to save") }
        guard blocks.allSatisfy({ $0.strata == first.strata && $0.expertSizes == first.expertSizes && $0.topK == first.topK }) else {
            throw GraftError(.state, "stratified MoE: the blocks differ in strata, expert sizes or top_k; the format holds one layout")
        }
        var writer = SafeTensorsWriter()
        for b in blocks { try RoutingFiles.add(b, prefix: b.path, to: &writer) }
        let layers = model.layers.enumerated().filter { $0.element.feedForwardOverride is StratifiedMoE }.map(\.offset)
        try RoutingFiles.write(directory: directory, kind: "stratified-moe", format: formatName, model: model, configName: configName,
                               fields: ["moe_layers": layers, "strata": first.strata, "expert_sizes": first.expertSizes,
                                        "expert_slice": first.gateWeight.shape[1], "top_k": first.topK, "norm_eps": Double(first.normEps)],
                               extra: extra, tensorsName: tensorsName, writer: writer)
    }

    /// Makes the dense `model` carry the stratified blocks saved in `directory`; the file and field or tensor at
    /// fault are named, and on an error the model is unchanged.
    public static func load(into model: LlamaModel, from directory: String) throws {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        func list(_ key: String) throws -> [Int] {
            guard let v = try config.ints(key), !v.isEmpty else { throw GraftError.format("\(configPath): field '\(key)' must be a non-empty list of integers") }
            return v
        }
        let layers = try list("moe_layers"), strata = try list("strata"), sizes = try list("expert_sizes")
        let slice = try config.int("expert_slice"), topK = try config.int("top_k")
        let eps = Float(try config.double("norm_eps"))
        let h = model.config.hiddenSize, e = strata.reduce(0, +)
        guard layers.allSatisfy({ (0..<model.layers.count).contains($0) }), Set(layers).count == layers.count else {
            throw GraftError.format("\(configPath): field 'moe_layers' \(layers) must be distinct layers of the model's \(model.layers.count)")
        }
        guard strata.allSatisfy({ $0 >= 1 }), sizes.count == e, slice == sizes.max(), sizes.allSatisfy({ $0 >= 1 }),
              slice <= 4 * model.config.intermediateSize else {
            throw GraftError.format("\(configPath): fields 'strata' \(strata), 'expert_sizes' (\(sizes.count) values) and 'expert_slice' \(slice) do not fit together")
        }
        guard eps.isFinite, eps > 0 else { throw GraftError.format("\(configPath): field 'norm_eps' is \(eps), expected a positive number") }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        var made: [(Int, StratifiedMoE)] = []
        for i in layers {
            let block: StratifiedMoE
            do {
                block = try StratifiedMoE(path: "model.layers.\(i).mlp", strata: strata, expertSizes: sizes,
                                          gate: Tensor(zeros: [e, slice, h]), up: Tensor(zeros: [e, slice, h]), down: Tensor(zeros: [e, h, slice]),
                                          routers: strata.map { _ in (Tensor(zeros: [e, h]), Tensor(zeros: [e])) },
                                          norms: strata.dropFirst().map { _ in Tensor(zeros: [h]) }, normEps: eps, topK: topK)
            } catch let error as GraftError {
                throw GraftError.format("\(configPath): \(error.message)")
            }
            try RoutingFiles.fill(block, prefix: block.path, from: file, path: tensorsPath)
            made.append((i, block))
        }
        try model.checkNoFeedForwardAdapters()
        model.removeMoEBlocks()
        for (i, b) in made { model.layers[i].feedForwardOverride = b }
    }
}
