import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor

/// X-LoRA's options (PEFT's `XLoraConfig`), read and checked once.
public struct XLoRAOptions: Sendable {
    /// The LoRA experts, by name and directory, in classifier order: the names sorted, as PEFT writes the
    /// config's `adapters` object (sorted keys) and numbers the experts.
    public var experts: [(name: String, path: String)]
    /// `hidden_size`: the classifier's input width (must be the model's hidden size); nil = the model's.
    public var hiddenSize: Int?
    /// `enable_softmax` (true): softmax of the classifier's logits over the experts.
    public var enableSoftmax = true
    /// `enable_softmax_topk` (false): softmax over the experts `top_k_lora` keeps, per layer.
    public var enableSoftmaxTopK = false
    /// `layerwise_scalings` (false): one set of scalings per adapted layer rather than one for all.
    public var layerwiseScalings = false
    /// `xlora_depth` (1): Linear layers in the classifier.
    public var depth = 1
    /// `xlora_size` (2048): the classifier's hidden width when `xlora_depth` > 1.
    public var size = 2048
    /// `xlora_dropout_p` (0.2): dropout after each hidden layer of the classifier while training.
    public var dropout: Float = 0.2
    /// `softmax_temperature` (1): the softmax divides the logits by it.
    public var temperature: Float = 1
    /// `top_k_lora` (none): each token keeps its `k` largest scalings per layer, the rest are zeroed.
    public var topK: Int?
    /// `scaling_pass_value` (0): the scaling every expert gets in the scaling pass.
    public var scalingPassValue: Float = 0
    /// `global_scaling_weight` (1): multiplies every expert's output when scalings are applied.
    public var globalScalingWeight: Float = 1
    /// `use_trainable_adapters` (false): the LoRA experts train with the classifier (else they stay frozen).
    public var trainableAdapters = false

    /// Parses `config`; every X-LoRA key is read here, so ``AdapterConfig/rejectUnhonouredKeys()`` names any other.
    public init(_ config: AdapterConfig) throws {
        let src = config.source
        guard let raw = config.value("adapters") as? [String: Any] else {
            throw GraftError.invalid("\(src): 'adapters' must be an object of expert name → LoRA adapter directory, got \(JSONScalar.describe(config.value("adapters")))")
        }
        experts = try raw.keys.sorted().map { name in
            guard let path = raw[name] as? String, !path.isEmpty else {
                throw GraftError.invalid("\(src): 'adapters' entry '\(name)' must be a directory path, got \(JSONScalar.describe(raw[name]))")
            }
            return (name, path)
        }
        guard !experts.isEmpty else { throw GraftError.invalid("\(src): 'adapters' is empty; X-LoRA needs at least one LoRA expert") }
        if let h = config.value("hidden_size"), !(h is NSNull) {
            hiddenSize = try config.int("hidden_size", default: 0)
            guard let hs = hiddenSize, hs > 0 else { throw GraftError.invalid("\(src): 'hidden_size' must be positive, got \(JSONScalar.describe(h))") }
        }
        enableSoftmax = try config.bool("enable_softmax", default: true)
        enableSoftmaxTopK = try config.bool("enable_softmax_topk", default: false)
        layerwiseScalings = try config.bool("layerwise_scalings", default: false)
        depth = try config.int("xlora_depth", default: 1)
        guard depth >= 1, depth <= 64 else { throw GraftError.invalid("\(src): 'xlora_depth' must be in 1...64, got \(depth)") }
        size = try config.int("xlora_size", default: 2048)
        guard size >= 1, size <= AdapterConfig.maximumSize else {
            throw GraftError.invalid("\(src): 'xlora_size' must be in 1...\(AdapterConfig.maximumSize), got \(size)")
        }
        let p = try config.double("xlora_dropout_p", default: 0.2)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(src): 'xlora_dropout_p' must be in [0, 1), got \(p)") }
        dropout = Float(p)
        let t = try config.double("softmax_temperature", default: 1)
        guard t > 0, t.isFinite else { throw GraftError.invalid("\(src): 'softmax_temperature' must be positive, got \(t)") }
        temperature = Float(t)
        if let k = config.value("top_k_lora"), !(k is NSNull) {
            let kk = try config.int("top_k_lora", default: 1)
            guard kk >= 1, kk <= experts.count else {
                throw GraftError.invalid("\(src): 'top_k_lora' must be in 1...\(experts.count) (the number of experts), got \(kk)")
            }
            topK = kk
        }
        let pass = try config.double("scaling_pass_value", default: 0)
        guard pass.isFinite else { throw GraftError.invalid("\(src): 'scaling_pass_value' must be finite, got \(pass)") }
        scalingPassValue = Float(pass)
        let g = try config.double("global_scaling_weight", default: 1)
        guard g.isFinite else { throw GraftError.invalid("\(src): 'global_scaling_weight' must be finite, got \(g)") }
        globalScalingWeight = Float(g)
        trainableAdapters = try config.bool("use_trainable_adapters", default: false)
    }

    /// The directory of expert `path`: absolute as given; a relative path is taken from the X-LoRA directory
    /// when the config came from one (PEFT opens it from the working directory, the same when run there),
    /// else from the working directory; when it does not exist, the sub-folder named after the expert (the
    /// layout of PEFT's hub checkpoints).
    static func resolve(_ path: String, name: String, source: String) -> String {
        let fm = FileManager.default
        let base = source.hasSuffix("/adapter_config.json") ? String(source.dropLast("/adapter_config.json".count)) : nil
        var candidates: [String] = []
        if path.hasPrefix("/") { candidates.append(path) } else {
            if let base { candidates.append(base + "/" + path) }
            candidates.append(fm.currentDirectoryPath + "/" + path)
        }
        if let base { candidates.append(base + "/" + name) }
        let found = candidates.first { fm.fileExists(atPath: $0 + "/adapter_config.json") } ?? candidates[0]
        return URL(fileURLWithPath: found).standardizedFileURL.path
    }
}

/// One LoRA expert of an X-LoRA adapter: its config and weights, read once from its PEFT directory.
struct XLoRAExpert {
    let name: String
    let directory: String
    let config: AdapterConfig
    let file: SafeTensorsFile

    init(name: String, path: String, source: String) throws {
        self.name = name
        directory = XLoRAOptions.resolve(path, name: name, source: source)
        let saved: SavedDirectory
        do {
            saved = try SavedDirectory(path: directory)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(source): X-LoRA expert '\(name)' at '\(directory)': \(e.message)")
        }
        guard saved.contains("adapter_config.json"), saved.contains("adapter_model.safetensors") else {
            throw GraftError(.notFound, "\(source): X-LoRA expert '\(name)': '\(directory)' is not a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)")
        }
        let text = String(decoding: try saved.contents("adapter_config.json"), as: UTF8.self)
        config = try AdapterConfig(jsonText: text, source: directory + "/adapter_config.json")
        guard config.peftType == LoRAFactory.peftType else {
            throw GraftError(.unsupported, "\(config.source): X-LoRA expert '\(name)' is \(config.peftType); X-LoRA mixes LORA adapters")
        }
        try LoRAFactory.validate(config)
        // PEFT's X-LoRA layer runs plain LoRA: A, B, scaling and dropout.
        for flag in ["use_dora", "lora_bias"] where try config.bool(flag, default: false) {
            throw GraftError(.unsupported, "\(config.source): X-LoRA expert '\(name)' sets '\(flag)', which X-LoRA does not support (as in PEFT)")
        }
        if let initial = config.value("init_lora_weights"), !(initial is NSNull), JSONScalar.bool(initial) == nil {
            throw GraftError(.unsupported, "\(config.source): X-LoRA expert '\(name)' has init_lora_weights \(JSONScalar.describe(initial)); X-LoRA takes plain LoRA factors (true or false)")
        }
        if let p = config.value("target_parameters") as? [Any], !p.isEmpty {
            throw GraftError(.unsupported, "\(config.source): X-LoRA expert '\(name)' uses target_parameters; X-LoRA adapts modules named by target_modules")
        }
        file = try saved.safeTensors("adapter_model.safetensors")
    }

    /// The expert's factor `which` (`lora_A` / `lora_B`) for the module at `path`, nil when it does not adapt it.
    func factor(_ which: String, path: String) throws -> Tensor? {
        for key in ["base_model.model.\(path).\(which).weight", "base_model.model.\(path).\(which).default.weight"] where file.contains(key) {
            return try file.tensor(key)
        }
        return nil
    }
}

/// X-LoRA (`peft_type: "XLORA"`, PEFT's `xlora`; Buehler & Buehler, 2024): a classifier over the hidden states
/// scales several frozen LoRA experts per token and per layer.
///
/// Before each forward pass a scaling pass runs the model with every expert scaled by `scaling_pass_value` (0:
/// the base model) and no gradients; the classifier (`xlora_depth` Linear layers, ReLU and dropout between,
/// PEFT's `internal_xlora_classifier.layers.<i>`) maps its last hidden states to one scaling per expert per
/// token, for every adapted layer (`layerwise_scalings`) or one set for all, softmaxed over the experts at
/// `softmax_temperature`. Each adapted Linear then adds `g · Σₑ sₑ · (αₑ/rₑ) Bₑ Aₑ x` (g = `global_scaling_weight`),
/// after an optional per-layer top-k (`top_k_lora`) and softmax over the kept experts (`enable_softmax_topk`).
/// The experts are read from their PEFT directories (`adapters`: name → path), the X-LoRA directory holding the
/// config and the classifier, as PEFT's `from_pretrained` loads it. Only the classifier trains, unless
/// `use_trainable_adapters` is true: then the experts' factors train with it, as in PEFT, and are saved in the
/// X-LoRA file as `base_model.model.<module>.lora_A.<expert number>.weight` (PEFT names the experts `"0"`,
/// `"1"`, … in classifier order); loading such a file takes the trained factors from it.
public enum XLoRAFactory: AdapterMethodFactory {
    public static let peftType = "XLORA"
    public static let family = "routed mixture of LoRA experts (X-LoRA: hidden-state classifier)"
    public static let mergeable = false
    /// The key prefix of the classifier's tensors in PEFT's file.
    public static let classifierPrefix = "base_model.internal_xlora_classifier.layers."
    /// The key under which the shared runtime lives in ``GraftAdapters/AdapterState/methodObjects``.
    static let runtimeKey = "xlora"

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["adapters": [String: Any](), "xlora_depth": 1, "layerwise_scalings": true]
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try XLoRAOptions(config)
    }

    /// Every Linear one of the experts adapts (its `target_modules`, `exclude_modules`, `layers_to_transform`).
    public static func targetPaths(config: AdapterConfig, root: Module) throws -> Set<String>? {
        let options = try XLoRAOptions(config)
        let heads = Set(root.children.map(\.name).filter { ["lm_head", "classifier", "score"].contains($0) })
        var paths = Set<String>()
        for (name, path) in options.experts {
            let expert = try XLoRAExpert(name: name, path: path, source: config.source)
            let matcher = TargetMatcher(config: expert.config)
            for (p, module) in root.namedModules() where !p.isEmpty && module is Linear
                && matcher.matches(path: p, isLinear: true, isOutputHead: heads.contains(p)) {
                paths.insert(p)
            }
        }
        return paths
    }

    /// Reads the experts and builds the classifier (its tensors are the adapter's trainable, saved tensors).
    public static func sharedTensors(forTargets targets: [(path: String, layer: Linear)], config: AdapterConfig,
                                     state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let options = try XLoRAOptions(config)
        let experts = try options.experts.map { try XLoRAExpert(name: $0.name, path: $0.path, source: config.source) }
        let hidden = options.hiddenSize ?? targets.first.map { $0.layer.inFeatures } ?? 0
        let classifier = XLoRAClassifier(options: options, hiddenSize: hidden, experts: experts.count,
                                         layers: targets.count, rng: &state.rng)
        let runtime = XLoRARuntime(options: options, experts: experts, classifier: classifier, state: state,
                                   layerNumbers: Dictionary(targets.enumerated().map { ($0.element.path, $0.offset) },
                                                            uniquingKeysWith: { a, _ in a }))
        state.methodObjects[runtimeKey] = runtime
        return classifier.namedTensors
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let runtime = state.methodObjects[runtimeKey] as? XLoRARuntime, let number = runtime.layerNumbers[path] else {
            throw GraftError(.internalError, "\(config.source): X-LoRA layer '\(path)' built before its experts were read")
        }
        var members: [(index: Int, lora: LoRALayer)] = []
        for (i, expert) in runtime.experts.enumerated() {
            guard let a = try expert.factor("lora_A", path: path) else { continue }
            guard let b = try expert.factor("lora_B", path: path) else {
                throw GraftError.format("\(expert.directory)/adapter_model.safetensors: has lora_A but no lora_B for '\(path)'")
            }
            let made = try LoRAFactory.make(for: layer, path: path, config: expert.config, state: AdapterState(seed: 0), shared: [:])
            guard let lora = made as? LoRALayer else {
                throw GraftError(.unsupported, "\(expert.config.source): X-LoRA expert '\(expert.name)' is not plain LoRA at '\(path)'")
            }
            do {
                try lora.load("lora_A.weight", from: a)
                try lora.load("lora_B.weight", from: b)
            } catch let e as GraftError {
                throw GraftError(e.code, "\(expert.directory)/adapter_model.safetensors: '\(path)': \(e.message)")
            }
            // PEFT freezes the experts unless use_trainable_adapters.
            lora.loraA.requiringGrad(runtime.options.trainableAdapters)
            lora.loraB.requiringGrad(runtime.options.trainableAdapters)
            members.append((i, lora))
        }
        return XLoRALayer(runtime: runtime, layerNumber: number, path: path, members: members)
    }

    /// Checks the experts' files and keys, then installs the scaling pass on the model.
    public static func didAttach(_ adapter: NamedAdapter, root: Module) throws {
        guard let runtime = adapter.state.methodObjects[runtimeKey] as? XLoRARuntime else { return }
        guard let host = hookHost(root) else {
            throw GraftError(.unsupported, "\(adapter.config.source): X-LoRA needs a model that runs forward-pass hooks (BERT, Llama), not \(root.typeName)")
        }
        if let width = (host as? any PromptHost)?.embeddingWidth, runtime.classifier.inputWidth != width {
            throw GraftError.invalid("\(adapter.config.source): 'hidden_size' \(runtime.classifier.inputWidth) differs from the model's hidden size \(width)")
        }
        let adapted = Set(adapter.layers.map(\.path))
        for expert in runtime.experts {
            for key in expert.file.names {
                let module = key.replacingOccurrences(of: "base_model.model.", with: "")
                    .replacingOccurrences(of: ".default.weight", with: ".weight")
                let path = module.replacingOccurrences(of: ".lora_A.weight", with: "").replacingOccurrences(of: ".lora_B.weight", with: "")
                guard path != module, adapted.contains(path) else {
                    throw GraftError.format("\(expert.directory)/adapter_model.safetensors: tensor '\(key)' is not a LoRA factor of a module this model has"
                        + " (X-LoRA mixes its experts' LoRA factors only: an expert saved with modules_to_save, such as a classifier head, must be saved without it)")
                }
            }
            try expert.config.rejectUnhonouredKeys()
        }
        runtime.host = host
        host.forwardHooks.append(runtime)
    }

    public static func willDetach(_ adapter: NamedAdapter, root: Module) {
        guard let runtime = adapter.state.methodObjects[runtimeKey] as? XLoRARuntime, let host = hookHost(root) else { return }
        host.forwardHooks.removeAll { $0 === runtime }
        runtime.host = nil
    }

    /// The model under `root` whose forward passes run hooks (the encoder inside a classification model).
    static func hookHost(_ root: Module) -> (any ForwardHookHost)? {
        root as? any ForwardHookHost ?? root.namedModules().lazy.compactMap { $0.module as? any ForwardHookHost }.first
    }

    /// The saved config names each expert by its absolute directory, so the saved adapter loads from anywhere.
    public static func exportedConfigJSON(_ json: [String: Any], adapter: NamedAdapter) -> [String: Any] {
        guard let runtime = adapter.state.methodObjects[runtimeKey] as? XLoRARuntime else { return json }
        var out = json
        out["adapters"] = Dictionary(runtime.experts.map { ($0.name, $0.directory) }, uniquingKeysWith: { a, _ in a })
        if out["hidden_size"] == nil { out["hidden_size"] = runtime.classifier.inputWidth }
        return out
    }

    /// The scalings of the last forward pass, `[batch, length, layers, experts]` as PEFT's
    /// `get_latest_scalings()` (before top-k), or nil before the first pass or for another method.
    public static func latestScalings(_ adapter: NamedAdapter) -> Tensor? {
        (adapter.state.methodObjects[runtimeKey] as? XLoRARuntime)?.latestScalings
    }
}
