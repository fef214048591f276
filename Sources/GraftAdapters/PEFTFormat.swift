import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Reading and writing adapters in the layout Hugging Face PEFT uses: a directory with `adapter_config.json`
/// and `adapter_model.safetensors`, tensor keys `base_model.model.<module path>.<parameter>` with the adapter
/// name stripped.
extension AdaptedModel {
    /// Loads a PEFT adapter directory as adapter `name` and makes it active.
    ///
    /// A directory Graft saved carries a manifest (``AtomicDirectory``): its files are checked against it
    /// first, and a directory mixing two saves is a `.format` error naming the file, never loaded.
    @discardableResult
    public func loadAdapter(directory: String, name: String = "default") throws -> NamedAdapter {
        let saved = try SavedDirectory(path: directory)
        let configPath = directory + "/adapter_config.json"
        guard saved.contains("adapter_config.json"), let data = try? saved.contents("adapter_config.json") else {
            throw GraftError(.notFound, "\(configPath): cannot read the adapter config (is '\(directory)' a PEFT adapter directory?)")
        }
        let config = try AdapterConfig(jsonText: String(decoding: data, as: UTF8.self), source: configPath)
        let weightsPath = directory + "/adapter_model.safetensors"
        guard saved.contains("adapter_model.safetensors") else {
            throw GraftError(.notFound, "\(weightsPath): missing (PEFT's .bin format is not supported; save with safe_serialization=True)")
        }
        let file = try saved.safeTensors("adapter_model.safetensors")
        // The file's tensors replace whatever the initialization drew, so the init options cannot matter.
        config.acknowledge("init_weights", "init_lora_weights", "init_ia3_weights")
        let adapter = try addAdapter(name, config: config)
        do {
            try loadWeights(file, into: adapter)
        } catch {
            try? deleteAdapter(name)
            throw error
        }
        return adapter
    }

    /// Copies a PEFT state dict into `adapter`; every expected key must be present and every key used.
    public func loadWeights(_ file: SafeTensorsFile, into adapter: NamedAdapter) throws {
        // Loaded weights are trained weights: no data-driven initialization may replace them.
        adapter.pendingDataInitialization = nil
        var expected: [String: (any LinearAdapterMethod, String)] = [:]
        var integers: [String: (any LinearAdapterMethod, String)] = [:]
        var moduleParams: [String: (any ModuleAdapterMethod, String)] = [:]
        for (path, m) in adapter.modules {
            // What PEFT's file holds for the module (Cartridges' whole table, CPT's E + δ), which may differ from the
            // trainable parameters; each adapter's `load` maps it back.
            for (n, _) in m.exportedParameters { moduleParams[m.key(n, path: path)] = (m, n) }
        }
        var buffers: [String: (any LinearAdapterMethod, String)] = [:]
        for (path, _, layer) in adapter.layers {
            for (n, _) in layer.namedParameters { expected["base_model.model.\(path).\(n)"] = (layer, n) }
            for (n, _, _) in layer.integerBuffers { integers["base_model.model.\(path).\(n)"] = (layer, n) }
            for (n, _) in layer.savedBuffers { buffers["base_model.model.\(path).\(n)"] = (layer, n) }
        }
        for (path, _, layer) in adapter.savedModules {
            for (n, _) in layer.namedParameters { expected["base_model.model.\(path).\(n)"] = (layer, n) }
        }
        var seen = Set<String>()
        for (key, tensor) in adapter.shared where file.contains(key) {
            // Integer buffers shared by layers (FRoD's sparse positions) are held as floats (exact below 2²⁴).
            let t = file.info(key)?.dtype.isInteger == true
                ? Tensor(shape: file.info(key)?.shape ?? [], values: try file.int64s(key).map { Float($0) }) : try file.tensor(key)
            guard t.shape == tensor.shape else {
                throw GraftError.format("\(file.path): '\(key)' has shape \(t.shape), the adapter expects \(tensor.shape)")
            }
            tensor.pointer.update(from: t.pointer, count: t.count)
            seen.insert(key)
        }
        for key in file.names where !seen.contains(key) {
            // Tolerate keys that still carry the adapter name (`lora_A.default.weight`).
            let normalized = key.replacingOccurrences(of: ".\(adapter.name).", with: ".")
            if let (layer, n) = integers[normalized] {
                let shape = file.info(key)?.shape ?? []
                do {
                    try layer.loadIntegers(n, values: try file.int64s(key), shape: shape)
                } catch let e as GraftError {
                    throw GraftError(e.code, "\(file.path): \(key): \(e.message)")
                }
                seen.insert(normalized)
                continue
            }
            if let (layer, n) = buffers[normalized] {
                // Frozen per-layer tensors: copies of shared bases (loaded above) or a layer's own (restored here).
                do {
                    try layer.loadBuffer(n, from: try file.tensor(key))
                } catch let e as GraftError {
                    throw GraftError(e.code, "\(file.path): \(key): \(e.message)")
                }
                seen.insert(normalized)
                continue
            }
            if let (m, n) = moduleParams[normalized] {
                do {
                    try m.load(n, from: try file.tensor(key))
                } catch let e as GraftError {
                    throw GraftError(e.code, "\(file.path): \(key): \(e.message)")
                }
                seen.insert(normalized)
                continue
            }
            guard let (layer, n) = expected[normalized] else {
                throw GraftError.format("\(file.path): tensor '\(key)' does not belong to any adapted module of this model (config targets \(adapter.layers.count) layers)")
            }
            let t = try file.tensor(key)
            do {
                try layer.load(n, from: t)
            } catch let e as GraftError {
                throw GraftError(e.code, "\(file.path): \(key): \(e.message)")
            }
            seen.insert(normalized)
        }
        let regenerated = (try? methods.factory(for: adapter.config))?.regeneratesSharedTensors ?? false
        // Frozen shared tensors a factory regenerates exactly (PVeRA's projections) need not be in the file.
        if let unsaved = adapter.shared.first(where: { !seen.contains($0.key) && !(regenerated && !$0.tensor.requiresGrad) }) {
            throw GraftError.format("\(file.path): missing '\(unsaved.key)' (the adapter was saved without save_projection; Graft cannot regenerate PyTorch's random projection)")
        }
        let missing = (Array(expected.keys) + Array(integers.keys) + Array(moduleParams.keys)).filter { !seen.contains($0) }.sorted()
        if !missing.isEmpty {
            throw GraftError.format("\(file.path): missing \(missing.count) adapter tensors, e.g. '\(missing[0])'")
        }
    }

    /// Writes adapter `name` as PEFT does (`adapter_config.json` + `adapter_model.safetensors`) with Graft's
    /// manifest, crash-safely: a directory of its own is replaced as a whole, so a process killed mid-save
    /// leaves the previous adapter or the new one, never a mix (see ``AtomicDirectory``).
    public func saveAdapter(_ name: String, directory: String) throws {
        try AtomicDirectory.write(directory: directory, kind: "adapter", files: try adapterFiles(name))
    }

    /// The files of adapter `name` in PEFT's layout, in memory: `adapter_model.safetensors` and
    /// `adapter_config.json` (checkpoints save them together with their own files).
    public func adapterFiles(_ name: String) throws -> [(name: String, bytes: [UInt8])] {
        let a = try adapter(name)
        var writer = SafeTensorsWriter()
        writer.metadata = ["format": "pt"]
        // SVD-initialized LoRA (PiSSA, MiLoRA, CorDA) is written as the equivalent plain LoRA (see PiSSA.swift).
        let (stateDict, config) = try a.exportedLoRA() ?? (a.peftExportDict, a.config)
        for (key, t) in stateDict { try writer.add(key, t) }
        let factory = try? methods.factory(for: a.config)
        for (key, t) in a.shared {
            if factory?.sharedTensorIsInteger(key) == true {
                try writer.add(key, int64s: t.scalars.map { Int64($0) }, shape: t.shape)
            } else {
                try writer.add(key, t)
            }
        }
        for (path, _, layer) in a.layers {
            for (n, values, shape) in layer.integerBuffers { try writer.add("base_model.model.\(path).\(n)", int32s: values, shape: shape) }
            for (n, t) in layer.savedBuffers { try writer.add("base_model.model.\(path).\(n)", t) }
        }
        var configJSON = AdaptedModel.peftConfigJSON(config)
        if let factory { configJSON = factory.exportedConfigJSON(configJSON, adapter: a) }
        if configJSON["task_type"] is NSNull, root is LlamaModel,
           let module = methods.modules[config.peftType], module.actsOnInput || module.requiresDecoder {
            // Without a task type PEFT builds a bare PeftModel, whose forward never injects virtual tokens or
            // prefixes: the adapter would load and do nothing.
            configJSON["task_type"] = "CAUSAL_LM"
        }
        if configJSON["task_type"] is NSNull, config.peftType == LoRAFactory.peftType, a.modules.contains(where: { $0.adapter is ALoRAActivation }) {
            // PEFT computes aLoRA's activation only in PeftModelForCausalLM: without the task type it never activates.
            configJSON["task_type"] = "CAUSAL_LM"
        }
        let json = try JSONSerialization.data(withJSONObject: configJSON,
                                              options: [.prettyPrinted, .sortedKeys])
        return [("adapter_model.safetensors", writer.serialized()), ("adapter_config.json", [UInt8](json))]
    }

    /// The config as PEFT 0.21 reads it: the user's keys plus the common keys PEFT expects.
    static func peftConfigJSON(_ config: AdapterConfig) -> [String: Any] {
        var json = config.json
        json["peft_type"] = config.peftType
        json["inference_mode"] = true
        if json["base_model_name_or_path"] == nil { json["base_model_name_or_path"] = NSNull() }
        if json["task_type"] == nil || json["task_type"] is NSNull {
            // PEFT's CPTConfig accepts CAUSAL_LM only.
            json["task_type"] = config.peftType == CPTFactory.peftType ? "CAUSAL_LM" : NSNull()
        }
        if json["revision"] == nil { json["revision"] = NSNull() }
        if config.peftType == "LORA" {
            let defaults: [String: Any] = [
                "r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "use_rslora": false, "use_dora": false,
                "fan_in_fan_out": false, "init_lora_weights": true, "rank_pattern": [String: Any](),
                "alpha_pattern": [String: Any](), "modules_to_save": NSNull(), "layers_to_transform": NSNull(),
                "layers_pattern": NSNull(), "exclude_modules": NSNull(), "lora_bias": false,
            ]
            for (k, v) in defaults where json[k] == nil { json[k] = v }
        }
        return json
    }
}
