import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads DyT's dispatchers and adapters; the decoder itself is not saved (they retrofit a frozen base).
///
/// A saved directory holds:
/// - `dyt_config.json`: `{"format": "graft-dyt", "version": 1, "layers": L, "hidden_size": h, "dyt_layers":
///   [i, ...], "adapter_dim": d, "adapter_experts": E, "temperature": τ}` plus informational fields (the training
///   `target_rate`, ...);
/// - `dyt_weights.safetensors`: per DyT layer `i`, `model.layers.i.mlp.dispatcher.weight` F32 `[1, h]`,
///   `.dispatcher.bias` F32 `[1]`, per expert `e` `.adapter.e.down.weight` F32 `[d, h]` and `.adapter.e.up.weight`
///   F32 `[h, d]`, and with `E > 1` `.adapter.router.weight` F32 `[E, h]`;
/// - the `graft_manifest.json` every Graft save writes (kind `dyt`).
public enum DyTFormat {
    /// The config file's name.
    public static let configName = "dyt_config.json"
    /// The tensor file's name.
    public static let tensorsName = "dyt_weights.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-dyt"

    /// Saves the DyT blocks of `model` into `directory`; `extra` adds informational config fields.
    public static func save(model: LlamaModel, to directory: String, extra: [String: Any] = [:]) throws {
        let placed = model.layers.enumerated().compactMap { i, l in (l.feedForwardOverride as? DyTFeedForward).map { (i, $0) } }
        guard let first = placed.first?.1 else { throw GraftError.invalid("DyT: the model has no DyT block to save") }
        var writer = SafeTensorsWriter()
        for (_, b) in placed {
            guard b.adapterDown.count == first.adapterDown.count, b.adapterDown[0].shape == first.adapterDown[0].shape else {
                throw GraftError.invalid("DyT: \(b.path)'s adapter differs from \(first.path)'s; a saved DyT has one adapter shape")
            }
            try RoutingFiles.add(b, prefix: b.path, to: &writer)
        }
        try RoutingFiles.write(directory: directory, kind: "dyt", format: formatName, model: model, configName: configName,
                               fields: ["dyt_layers": placed.map(\.0), "adapter_dim": first.adapterDown[0].shape[0],
                                        "adapter_experts": first.adapterDown.count, "temperature": Double(first.temperature)],
                               extra: extra, tensorsName: tensorsName, writer: writer)
    }

    /// Gives `model` the DyT blocks saved in `directory` (in hard mode), validated against it: the file and field
    /// or tensor at fault are named, and on an error the model is unchanged.
    @discardableResult
    public static func load(into model: LlamaModel, from directory: String) throws -> [DyTFeedForward] {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        var options = DyTOptions()
        options.layers = try config.ints("dyt_layers")
        options.adapterDim = try config.int("adapter_dim")
        options.adapterExperts = try config.int("adapter_experts")
        options.temperature = Float(try config.double("temperature", default: 1))
        guard options.layers != nil else { throw GraftError.format("\(configPath): field 'dyt_layers' is missing") }
        guard (1...(1 << 16)).contains(options.adapterDim), (1...256).contains(options.adapterExperts) else {
            throw GraftError.format("\(configPath): fields 'adapter_dim' \(options.adapterDim) and 'adapter_experts' \(options.adapterExperts) must be in 1...65536 and 1...256")
        }
        do { try options.validate(layerCount: model.layers.count) } catch let e as GraftError {
            throw GraftError.format("\(configPath): \(e.message)")
        }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        let h = model.config.hiddenSize
        // Every tensor is read and checked before the model changes.
        var rng = GraftRNG(seed: 0)
        let blocks = try (options.layers ?? []).sorted().map { i -> DyTFeedForward in
            let block = DyTFeedForward(path: "model.layers.\(i).mlp", layer: model.layers[i], hidden: h, options: options, rng: &rng)
            try RoutingFiles.fill(block, prefix: block.path, from: file, path: tensorsPath)
            return block
        }
        model.removeMoEBlocks()
        for b in blocks { b.layer.feedForwardOverride = b }
        return blocks
    }
}
