import Foundation
import GraftIO
import GraftTensor

/// Which modules an adapter targets, as PEFT's `target_modules` says it.
public enum TargetModules: Sendable, Equatable {
    /// Module names matched exactly or as dotted suffixes (`"query"` matches `encoder.layer.0.attention.self.query`).
    case names([String])
    /// A regular expression that must match the whole module path.
    case regex(String)
    /// Every Linear layer except the output head (PEFT's `"all-linear"`).
    case allLinear
}

/// The keys of one config that have been read (a reference, so copies of the config share it).
final class KeyLedger: @unchecked Sendable {
    var read: Set<String> = []
}

/// The configuration keys every PEFT method shares (the common part of `adapter_config.json`), plus the
/// whole JSON object for method-specific keys.
public struct AdapterConfig: @unchecked Sendable {
    /// PEFT's `peft_type` (`"LORA"`, ...) or a Graft type for methods PEFT lacks.
    public var peftType: String
    /// `target_modules`.
    public var targetModules: TargetModules
    /// `exclude_modules`: names (exact or suffix) or a regex that must match the whole path.
    public var excludeModules: TargetModules?
    /// `layers_to_transform`: only layers with these indices are adapted.
    public var layersToTransform: [Int]?
    /// `layers_pattern`: the name of the layer list (`"layer"`, `"layers"`) used to find the layer index.
    public var layersPattern: [String]?
    /// `modules_to_save`: modules trained in full (as a copy) and saved with the adapter, e.g. `classifier`.
    public var modulesToSave: [String]
    /// `task_type` (`"SEQ_CLS"`, `"CAUSAL_LM"`, ...), if given.
    public var taskType: String?
    /// `base_model_name_or_path`, if given.
    public var baseModelNameOrPath: String?
    /// The whole JSON object (method-specific keys are read from here).
    public var json: [String: Any]
    /// Where the config came from, for error messages.
    public var source: String
    /// The keys the method and the common parser have read (shared by copies of this config).
    private let ledger = KeyLedger()

    /// Methods whose modules are the ones their member adapters target (X-LoRA), so `target_modules` is not
    /// required.
    public static let typesTargetingThroughExperts: Set<String> = ["XLORA"]

    /// Methods that adapt every MoE feed-forward block of an MoE base (ESFT, PERFT in GraftRouting), so
    /// `target_modules` is not required.
    public static let typesOnMoEBlocks: Set<String> = ["ESFT", "PERFT", "MOE_PLORA"]

    /// Keys that describe the file, not what the adapter computes.
    public static let descriptiveKeys: Set<String> = [
        "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    ]
    /// PEFT's defaults of options no Graft method implements: a file that leaves them at these values loads.
    static let inertDefaults: [String: String] = [
        "bias": "none", "megatron_core": "megatron.core", "qalora_group_size": "16", "init_weights": "true",
        "init_lora_weights": "true", "init_ia3_weights": "true",
    ]

    /// Parses the common keys of a PEFT `adapter_config.json` object.
    public init(json: [String: Any], source: String) throws {
        self.json = json
        self.source = source
        ledger.read.formUnion(["peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                               "modules_to_save"])
        guard let type = json["peft_type"] as? String else {
            throw GraftError.invalid("\(source): missing or non-string 'peft_type'")
        }
        peftType = type.uppercased()
        let targets = try AdapterConfig.parseTargets(json["target_modules"], field: "target_modules", source: source)
        // Prompt-learning methods act on the input, not on named modules.
        let promptLearning = AdapterRegistry.moduleFactories[peftType].map { $0.actsOnInput || $0.selectsLayers } ?? false
        // LoRA may name parameters instead (target_parameters, TargetParameters.swift).
        let parametersOnly = peftType == "LORA" && (json["target_parameters"] as? [Any]).map { !$0.isEmpty } == true
        // X-LoRA adapts the modules its LoRA experts target (XLoRA.swift in GraftRouting).
        let expertTargets = AdapterConfig.typesTargetingThroughExperts.contains(peftType)
            || AdapterConfig.typesOnMoEBlocks.contains(peftType)
        guard let targets = targets ?? (promptLearning || parametersOnly || expertTargets ? .names([]) : nil) else {
            throw GraftError.invalid("\(source): 'target_modules' is required (a list of module names, a regex string, or \"all-linear\")")
        }
        targetModules = targets
        excludeModules = try AdapterConfig.parseTargets(json["exclude_modules"], field: "exclude_modules", source: source)
        switch json["layers_to_transform"] {
        case nil, is NSNull: layersToTransform = nil
        case let n? where JSONScalar.integer(n) != nil: layersToTransform = JSONScalar.integer(n).map { [$0] }
        case let list as [Any] where list.allSatisfy({ JSONScalar.integer($0) != nil }):
            let indices = list.compactMap { JSONScalar.integer($0) }
            layersToTransform = indices.isEmpty ? nil : indices
        case let other?: throw GraftError.invalid("\(source): 'layers_to_transform' must be an integer or a list of integers, got \(other)")
        }
        switch json["layers_pattern"] {
        case nil, is NSNull: layersPattern = nil
        case let s as String: layersPattern = s.isEmpty ? nil : [s]
        case let list as [String]: layersPattern = list.isEmpty ? nil : list
        case let other?: throw GraftError.invalid("\(source): 'layers_pattern' must be a string or a list of strings, got \(other)")
        }
        switch json["modules_to_save"] {
        case nil, is NSNull: modulesToSave = []
        case let list as [String]: modulesToSave = list
        case let other?: throw GraftError.invalid("\(source): 'modules_to_save' must be a list of module names, got \(other)")
        }
        taskType = json["task_type"] as? String
        baseModelNameOrPath = json["base_model_name_or_path"] as? String
    }

    /// Parses `adapter_config.json` text.
    public init(jsonText: String, source: String) throws {
        let value: Any
        do {
            value = try JSONSerialization.jsonObject(with: Data(jsonText.utf8))
        } catch {
            throw GraftError.invalid("\(source): invalid JSON (\(error.localizedDescription))")
        }
        guard let object = value as? [String: Any] else { throw GraftError.invalid("\(source): expected a JSON object") }
        try self.init(json: object, source: source)
    }

    private static func parseTargets(_ value: Any?, field: String, source: String) throws -> TargetModules? {
        switch value {
        case nil, is NSNull: return nil
        case let s as String:
            if s.lowercased() == "all-linear" { return .allLinear }
            do { _ = try NSRegularExpression(pattern: s) } catch {
                throw GraftError.invalid("\(source): '\(field)' is not a valid regular expression: \(s)")
            }
            return .regex(s)
        case let list as [String]: return .names(list)
        case let other?: throw GraftError.invalid("\(source): '\(field)' must be a list of names or a string, got \(other)")
        }
    }

    // MARK: typed access to method-specific keys

    /// The raw value of `key` (nil when absent), recorded as honoured: every read of a method-specific key goes
    /// through here or the typed accessors below, so ``rejectUnhonouredKeys()`` knows what the method used.
    public func value(_ key: String) -> Any? {
        ledger.read.insert(key)
        return json[key]
    }

    /// Marks keys as honoured without reading them: keys that cannot change the result in this configuration
    /// (PEFT's own AdaLoRA ignores `r`; prompt-learning configs record the model's sizes). Say why at the call.
    public func acknowledge(_ keys: String...) {
        ledger.read.formUnion(keys)
    }

    /// Throws for the first key the method did not read whose value is not neutral (null, false, 0, empty; for
    /// keys with a PEFT default in ``inertDefaults``, that default only), naming it and the keys the method honours:
    /// no setting in an adapter_config.json is silently ignored. Descriptive keys (``descriptiveKeys``) pass.
    public func rejectUnhonouredKeys() throws {
        let unread = json.keys.filter { !ledger.read.contains($0) && !Self.descriptiveKeys.contains($0) }.sorted()
        for key in unread where !Self.isNeutral(json[key], default: Self.inertDefaults[key]) {
            let honoured = ledger.read.subtracting(["peft_type"]).sorted().joined(separator: ", ")
            throw GraftError(.unsupported, "\(source): '\(key)' = \(Self.render(json[key])) is not supported by Graft's \(peftType) (remove it or leave it at PEFT's default); \(peftType) honours: \(honoured)")
        }
    }

    private static func isNeutral(_ value: Any?, default inert: String?) -> Bool {
        switch value {
        case nil, is NSNull: return true
        case let list as [Any]: return list.isEmpty
        case let object as [String: Any]: return object.isEmpty
        default: break
        }
        let text = render(value)
        if let inert { return text == inert }
        return text == "false" || text == "0" || text == "0.0"
    }

    private static func render(_ value: Any?) -> String {
        switch value {
        case let s as String: return s
        case let v?: return JSONScalar.describe(v)
        case nil: return "null"
        }
    }

    /// The largest value accepted for a key that sizes an adapter's tensors or loops (``sizeKeys``): a rank of
    /// 65,536 is far beyond any published configuration, while a few more digits in a config would ask for
    /// gigabytes (`"r": 100000000` on a 384-wide layer is 154 GB).
    public static let maximumSize = 1 << 16

    /// The integer keys that size an adapter's tensors or loops (ranks, virtual tokens, blocks, banks, experts,
    /// tasks, frequencies); ``int(_:default:)`` rejects values above ``maximumSize`` for them, naming the key.
    public static let sizeKeys: Set<String> = [
        "r", "init_r", "target_r", "mini_r", "n_tasks", "n_skills", "n_splits", "num_virtual_tokens", "token_dim",
        "num_experts", "nb", "boft_n_butterfly_factor", "boft_block_size", "boft_block_num", "off_diag",
        "vector_length", "num_vectors", "topk", "top_k", "shared_shards", "shard_length", "oft_block_size",
        "num_cayley_neumann_terms", "n_frequency", "group_size", "encoder_hidden_size", "decompose_factor",
        "contrastive_tokens", "block_size", "adapter_len", "num_tasks", "num_ranks",
    ]

    /// An integer key (`3` or `3.0`, never `true`/`false`), or `defaultValue` when absent. A key in ``sizeKeys``
    /// above ``maximumSize`` is an error.
    public func int(_ key: String, default defaultValue: Int) throws -> Int {
        let value: Int
        switch self.value(key) {
        case nil, is NSNull: return defaultValue
        case let raw?:
            guard let n = JSONScalar.integer(raw) else {
                throw GraftError.invalid("\(source): '\(key)' must be an integer, got \(JSONScalar.describe(raw))")
            }
            value = n
        }
        if AdapterConfig.sizeKeys.contains(key), value > AdapterConfig.maximumSize {
            throw GraftError.invalid("\(source): '\(key)' is \(value), above the largest size Graft accepts (\(AdapterConfig.maximumSize))")
        }
        return value
    }

    /// A number key (never `true`/`false`), or `defaultValue` when absent.
    public func double(_ key: String, default defaultValue: Double) throws -> Double {
        switch value(key) {
        case nil, is NSNull: return defaultValue
        case let value?:
            guard let d = JSONScalar.number(value) else {
                throw GraftError.invalid("\(source): '\(key)' must be a number, got \(JSONScalar.describe(value))")
            }
            return d
        }
    }

    /// A fraction key in (0, 1] (a density, a keep ratio), or `defaultValue` when absent.
    public func fraction(_ key: String, default defaultValue: Double) throws -> Double {
        let d = try double(key, default: defaultValue)
        guard d > 0, d <= 1 else { throw GraftError.invalid("\(source): '\(key)' must be in (0, 1], got \(d)") }
        return d
    }

    /// A boolean key (`true`/`false`, never the numbers 0 and 1), or `defaultValue` when absent.
    public func bool(_ key: String, default defaultValue: Bool) throws -> Bool {
        switch value(key) {
        case nil, is NSNull: return defaultValue
        case let value?:
            guard let b = JSONScalar.bool(value) else {
                throw GraftError.invalid("\(source): '\(key)' must be true or false, got \(JSONScalar.describe(value))")
            }
            return b
        }
    }

    /// A string key, or nil when absent.
    public func string(_ key: String) throws -> String? {
        switch value(key) {
        case nil, is NSNull: return nil
        case let s as String: return s
        case let other?: throw GraftError.invalid("\(source): '\(key)' must be a string, got \(other)")
        }
    }

    /// The size a `{pattern: number}` key (`rank_pattern`, `n_frequency_pattern`) gives the module at `path`,
    /// else `defaultValue`. Pattern values arrive as numbers: a fraction, NaN, a value below 1 or above
    /// ``maximumSize`` is an error naming the key and module, never a trapping conversion.
    public func patternSize(_ key: String, path: String, default defaultValue: Int) throws -> Int {
        guard let value = TargetMatcher.patternValue(try patternMap(key), path: path) else { return defaultValue }
        guard let n = Int(exactly: value), n > 0, n <= AdapterConfig.maximumSize else {
            throw GraftError.invalid("\(source): '\(key)' gives '\(path)' \(value); it must be an integer in 1...\(AdapterConfig.maximumSize)")
        }
        return n
    }

    /// A `{pattern: number}` key such as `rank_pattern` / `alpha_pattern`, in file order.
    public func patternMap(_ key: String) throws -> [(pattern: String, value: Double)] {
        switch value(key) {
        case nil, is NSNull: return []
        case let d as [String: Any]:
            return try d.keys.sorted().map { k in
                guard let x = JSONScalar.number(d[k]) else {
                    throw GraftError.invalid("\(source): '\(key)' entry '\(k)' must be a number, got \(JSONScalar.describe(d[k]))")
                }
                return (k, x)
            }
        case let other?: throw GraftError.invalid("\(source): '\(key)' must be an object of pattern → number, got \(other)")
        }
    }
}
