import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Saves and loads Duo-LLM's routers and small FFNs; the decoder itself is not saved.
///
/// A saved directory holds:
/// - `duo_config.json`: `{"format": "graft-duo-llm", "version": 1, "layers": L, "hidden_size": h,
///   "intermediate_size": ff, "duo_layers": [i, ...], "small_size": s, "temperature": τ, "choices": ["skip",
///   "small", "big"]}` plus informational fields (the training `target_compute`, ...);
/// - `duo_weights.safetensors`: per Duo-LLM layer `i`, `model.layers.i.mlp.router.weight` F32 `[3, h]` and
///   `.router.bias` F32 `[3]` (scores in the order of `choices`), `.small.gate_proj` and `.small.up_proj` F32
///   `[s, h]`, `.small.down_proj` F32 `[h, s]`;
/// - the `graft_manifest.json` every Graft save writes (kind `duo-llm`).
public enum DuoLLMFormat {
    /// The config file's name.
    public static let configName = "duo_config.json"
    /// The tensor file's name.
    public static let tensorsName = "duo_weights.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-duo-llm"

    /// Saves the Duo-LLM blocks of `model` into `directory`; `extra` adds informational config fields.
    public static func save(model: LlamaModel, to directory: String, extra: [String: Any] = [:]) throws {
        let placed = model.layers.enumerated().compactMap { i, l in (l.feedForwardOverride as? DuoLLMFeedForward).map { (i, $0) } }
        guard let first = placed.first?.1 else { throw GraftError.invalid("Duo-LLM: the model has no Duo-LLM block to save") }
        var writer = SafeTensorsWriter()
        for (_, b) in placed {
            guard b.smallGate.shape == first.smallGate.shape else {
                throw GraftError.invalid("Duo-LLM: \(b.path)'s small FFN differs from \(first.path)'s; a saved Duo-LLM has one small size")
            }
            try RoutingFiles.add(b, prefix: b.path, to: &writer)
        }
        try RoutingFiles.write(directory: directory, kind: "duo-llm", format: formatName, model: model, configName: configName,
                               fields: ["duo_layers": placed.map(\.0), "small_size": first.smallGate.shape[0],
                                        "intermediate_size": model.config.intermediateSize,
                                        "temperature": Double(first.temperature), "choices": ["skip", "small", "big"]],
                               extra: extra, tensorsName: tensorsName, writer: writer)
    }

    /// Gives `model` the Duo-LLM blocks saved in `directory` (in hard mode), validated against it: the file and
    /// field or tensor at fault are named, and on an error the model is unchanged.
    @discardableResult
    public static func load(into model: LlamaModel, from directory: String) throws -> [DuoLLMFeedForward] {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        let ff = model.config.intermediateSize, h = model.config.hiddenSize
        let savedFF = try config.int("intermediate_size")
        guard savedFF == ff else { throw GraftError.format("\(configPath): field 'intermediate_size' is \(savedFF), the model has \(ff)") }
        var options = DuoLLMOptions()
        guard let layers = try config.ints("duo_layers") else { throw GraftError.format("\(configPath): field 'duo_layers' is missing") }
        options.layers = layers
        options.smallSize = try config.int("small_size")
        options.temperature = Float(try config.double("temperature", default: 1))
        do { try options.validate(layerCount: model.layers.count, intermediate: ff) } catch let e as GraftError {
            throw GraftError.format("\(configPath): \(e.message)")
        }
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        let s = options.smallSize
        var rng = GraftRNG(seed: 0)
        let blocks = try layers.sorted().map { i -> DuoLLMFeedForward in
            let block = DuoLLMFeedForward(path: "model.layers.\(i).mlp", layer: model.layers[i],
                                          small: (Tensor(zeros: [s, h]), Tensor(zeros: [s, h]), Tensor(zeros: [h, s])),
                                          intermediate: ff, options: options, rng: &rng)
            try RoutingFiles.fill(block, prefix: block.path, from: file, path: tensorsPath)
            return block
        }
        model.removeMoEBlocks()
        for b in blocks { b.layer.feedForwardOverride = b }
        return blocks
    }
}
