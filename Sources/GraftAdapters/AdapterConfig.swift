import Foundation
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

    /// Parses the common keys of a PEFT `adapter_config.json` object.
    public init(json: [String: Any], source: String) throws {
        self.json = json
        self.source = source
        guard let type = json["peft_type"] as? String else {
            throw GraftError.invalid("\(source): missing or non-string 'peft_type'")
        }
        peftType = type.uppercased()
        let targets = try AdapterConfig.parseTargets(json["target_modules"], field: "target_modules", source: source)
        // Prompt-learning methods act on the input, not on named modules.
        let promptLearning = AdapterRegistry.moduleFactories[peftType].map { $0.actsOnInput || $0.selectsLayers } ?? false
        guard let targets = targets ?? (promptLearning ? .names([]) : nil) else {
            throw GraftError.invalid("\(source): 'target_modules' is required (a list of module names, a regex string, or \"all-linear\")")
        }
        targetModules = targets
        excludeModules = try AdapterConfig.parseTargets(json["exclude_modules"], field: "exclude_modules", source: source)
        switch json["layers_to_transform"] {
        case nil, is NSNull: layersToTransform = nil
        case let n as Int: layersToTransform = [n]
        case let list as [Int]: layersToTransform = list.isEmpty ? nil : list
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
        "contrastive_tokens", "block_size",
    ]

    /// An integer key, or `defaultValue` when absent. A key in ``sizeKeys`` above ``maximumSize`` is an error.
    public func int(_ key: String, default defaultValue: Int) throws -> Int {
        let value: Int
        switch json[key] {
        case nil, is NSNull: return defaultValue
        case let n as Int: value = n
        case let d as Double where Int(exactly: d) != nil: value = Int(exactly: d) ?? defaultValue
        case let other?: throw GraftError.invalid("\(source): '\(key)' must be an integer, got \(other)")
        }
        if AdapterConfig.sizeKeys.contains(key), value > AdapterConfig.maximumSize {
            throw GraftError.invalid("\(source): '\(key)' is \(value), above the largest size Graft accepts (\(AdapterConfig.maximumSize))")
        }
        return value
    }

    /// A number key, or `defaultValue` when absent.
    public func double(_ key: String, default defaultValue: Double) throws -> Double {
        switch json[key] {
        case nil, is NSNull: return defaultValue
        case let d as Double: return d
        case let n as Int: return Double(n)
        case let other?: throw GraftError.invalid("\(source): '\(key)' must be a number, got \(other)")
        }
    }

    /// A boolean key, or `defaultValue` when absent.
    public func bool(_ key: String, default defaultValue: Bool) throws -> Bool {
        switch json[key] {
        case nil, is NSNull: return defaultValue
        case let b as Bool: return b
        case let other?: throw GraftError.invalid("\(source): '\(key)' must be true or false, got \(other)")
        }
    }

    /// A string key, or nil when absent.
    public func string(_ key: String) throws -> String? {
        switch json[key] {
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
        switch json[key] {
        case nil, is NSNull: return []
        case let d as [String: Any]:
            return try d.keys.sorted().map { k in
                switch d[k] {
                case let n as Int: return (k, Double(n))
                case let x as Double: return (k, x)
                default: throw GraftError.invalid("\(source): '\(key)' entry '\(k)' must be a number")
                }
            }
        case let other?: throw GraftError.invalid("\(source): '\(key)' must be an object of pattern → number, got \(other)")
        }
    }
}
