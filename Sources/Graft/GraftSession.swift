import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftRouting
import GraftTensor
import GraftText
import GraftTrain

/// A model loaded for a task with its adapters: the object behind the C ABI's `graft_model` handle and graftd's
/// models (and usable from Swift directly). Owns the ``GraftModel``, the ``TaskModel`` built on it and the
/// ``AdaptedModel`` wrapping that. Use from one thread at a time.
public final class GraftSession: @unchecked Sendable {
    /// The base model and tokenizer.
    public let model: GraftModel
    /// The model built for the task: what runs, trains and generates.
    public let taskModel: any TaskModel
    /// The task model wrapped for adapters (its root is the classifier, the encoder or the decoder).
    public let adapted: AdaptedModel
    /// What adapters created here record as `base_model_name_or_path`: the hub id or absolute path of the model.
    public let modelReference: String
    /// The number format the frozen weights are multiplied in (``ComputeDType/auto`` resolved).
    public let computeDType: ComputeDType
    /// Adapter names that live trainers train (a trained adapter cannot be deleted).
    public internal(set) var adaptersInTraining: [String: Int] = [:]

    /// The MoE base directory the decoder was made at load (``ModelOptions/moeBase``), or nil.
    public let moeBase: String?

    /// Loads the model at `path` for `task`; `numLabels` and `seed` shape and draw a classification head.
    /// `modelReference` is what saved adapters name as their base (default: the absolute path). `moeBase` (a
    /// directory `graft moefy --output` wrote) makes the Llama decoder that MoE base.
    public init(path: String, task: SessionTask, numLabels: Int = 2, seed: UInt64 = 0, modelReference: String? = nil,
                computeDType: ComputeDType = .float32, moeBase: String? = nil) throws {
        model = try GraftModel(path: path)
        taskModel = try TaskModels.make(model: model, task: task, numLabels: numLabels, seed: seed)
        self.computeDType = taskModel.root.setComputeDType(computeDType)
        if let moeBase { try model.loadMoEBase(moeBase) }
        self.moeBase = moeBase
        adapted = AdaptedModel(root: taskModel.root, methods: .all)
        self.modelReference = modelReference ?? URL(fileURLWithPath: path).standardizedFileURL.path
    }

    /// The task it was loaded for.
    public var task: SessionTask { taskModel.task }

    // MARK: adapters

    /// Adds adapter `name` from PEFT-shaped JSON text (`task_type` and `base_model_name_or_path` filled in
    /// when absent) and makes it active.
    public func addAdapter(name: String, configJSON: String, seed: UInt64 = 0) throws {
        try addAdapter(name: name, config: try AdapterConfig(jsonText: configJSON, source: "adapter config '\(name)'"), seed: seed)
    }

    /// Adds adapter `name` from a parsed config (`task_type` and `base_model_name_or_path` filled in when
    /// absent) and makes it active.
    public func addAdapter(name: String, config: AdapterConfig, seed: UInt64 = 0) throws {
        var config = config
        if config.json["task_type"] == nil || config.json["task_type"] is NSNull { config.json["task_type"] = taskModel.peftTaskType }
        if config.json["base_model_name_or_path"] == nil || config.json["base_model_name_or_path"] is NSNull {
            config.json["base_model_name_or_path"] = modelReference
        }
        try adapted.addAdapter(name, config: config, seed: seed)
    }

    /// Loads the PEFT adapter in `directory` as `name`, with its class names (`labels.json`) when the model
    /// classifies: they must match the head's class count, and string labels in data are numbered by them.
    /// A path ending in `.gguf` is a llama.cpp GGUF LoRA file instead (``loadGGUFLoRA(path:name:)``); a directory
    /// holding a ComPEFT or 1-bit packed file (``compressAdapter(name:method:directory:optionsJSON:)``) loads as the
    /// adapter those bits decode to.
    @discardableResult
    public func loadAdapter(directory: String, name: String = "default") throws -> NamedAdapter {
        if directory.lowercased().hasSuffix(".gguf") { return try loadGGUFLoRA(path: directory, name: name) }
        if let compressed = try loadCompressedAdapter(directory: directory, name: name) { return compressed }
        let names = try ClassLabelFile.read(directory: directory)
        if let names, let classifier = taskModel as? SequenceClassificationTaskModel {
            try SequenceClassificationTaskModel.check(names, numLabels: classifier.numLabels,
                                                      source: directory + "/" + ClassLabelFile.fileName)
        }
        let adapter = try adapted.loadAdapter(directory: directory, name: name)
        if let names, let classifier = taskModel as? SequenceClassificationTaskModel { classifier.labelNames = names }
        return adapter
    }

    /// The files of adapter `name` as saved: PEFT's two, plus `labels.json` when the classes have names.
    public func adapterFiles(_ name: String) throws -> [(name: String, bytes: [UInt8])] {
        var files = try adapted.adapterFiles(name)
        if let names = (taskModel as? SequenceClassificationTaskModel)?.labelNames {
            files.append((ClassLabelFile.fileName, try ClassLabelFile.encode(names)))
        }
        return files
    }

    /// Saves adapter `name` in PEFT's format to `directory` (atomically; see ``adapterFiles(_:)``).
    public func saveAdapter(_ name: String, directory: String) throws {
        try AtomicDirectory.write(directory: directory, kind: "adapter", files: try adapterFiles(name))
    }

    /// The names of the classifier's classes (transformers' `id2label`); nil when they are unnamed or the model
    /// does not classify.
    public var classNames: [String]? { (taskModel as? SequenceClassificationTaskModel)?.labelNames }

    /// Names the classifier's classes (saved with its adapters as `labels.json`); throws unless the model
    /// classifies into exactly `names.count` distinct classes.
    public func setClassNames(_ names: [String]) throws {
        guard let classifier = taskModel as? SequenceClassificationTaskModel else {
            throw GraftError(.unsupported, "class names: the model is loaded for \(task.name), not sequence classification")
        }
        try SequenceClassificationTaskModel.check(names, numLabels: classifier.numLabels, source: "class names")
        classifier.labelNames = names
    }

    /// Deletes adapter `name` unless a live trainer trains it.
    public func deleteAdapter(name: String) throws {
        _ = try adapted.adapter(name)
        if adaptersInTraining[name, default: 0] > 0 {
            throw GraftError(.state, "adapter '\(name)' is being trained; free its trainer before deleting it")
        }
        try adapted.deleteAdapter(name)
    }

    // MARK: description

    /// The model described as a JSON object (architecture, sizes, parameter count, module tree with shapes).
    public func infoJSON() throws -> String {
        var info: [String: Any] = [
            "architecture": model.architecture.rawValue, "path": model.path, "task": task.name,
            "parameters": adapted.root.parameterCount, "compute_dtype": computeDType.rawValue,
        ]
        info.merge(taskModel.configDescription) { _, new in new }
        if let moeBase, case .decoder(let llama) = model.backbone, let first = llama.moeBlocks.first {
            info["moe_base"] = ["path": moeBase, "experts": first.experts, "top_k": first.topK,
                                "moe_layers": llama.moeLayerIndices]
        }
        info["modules"] = Self.describe(adapted.root, name: "", path: "")
        return try Self.jsonString(info)
    }

    private static func describe(_ module: Module, name: String, path: String) -> [String: Any] {
        var node: [String: Any] = [
            "name": name, "path": path, "type": module.typeName, "parameter_count": module.parameterCount,
            "parameters": module.localParameters.map { ["name": $0.name, "shape": $0.tensor.shape] as [String: Any] },
        ]
        if !module.children.isEmpty {
            node["children"] = module.children.map {
                describe($0.module, name: $0.name, path: path.isEmpty ? $0.name : path + "." + $0.name)
            }
        }
        return node
    }

    /// Serializes a JSON-compatible value (sorted keys, compact).
    public static func jsonString(_ value: Any) throws -> String {
        guard JSONSerialization.isValidJSONObject(value) else {
            throw GraftError(.internalError, "cannot serialize a description to JSON")
        }
        let data = try JSONSerialization.data(withJSONObject: value, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// The adapters as JSON: active name, enabled flag, and one entry per adapter in id order.
    public func adapterListJSON() throws -> String {
        let list: [[String: Any]] = adapted.adapters.enumerated().map { i, a in
            [
                "id": i, "name": a.name, "peft_type": a.config.peftType, "active": a.name == adapted.activeAdapter,
                "merged": a.state.isMerged, "layers": a.layers.count, "trainable_parameters": a.parameterCount,
                "config": a.config.json,
            ]
        }
        return try Self.jsonString([
            "active": adapted.activeAdapter.map { $0 as Any } ?? NSNull(), "enabled": !adapted.adaptersDisabled,
            "adapters": list,
        ] as [String: Any])
    }
}
