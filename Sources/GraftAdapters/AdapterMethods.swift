import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Builds the per-layer adapter for one PEFT method from its config.
public protocol AdapterMethodFactory: Sendable {
    /// The `peft_type` this factory handles.
    static var peftType: String { get }
    /// The method's family (weight-delta, multiplicative/orthogonal, ...), for `graft methods`.
    static var family: String { get }
    /// Whether the adapter folds into the base weights.
    static var mergeable: Bool { get }
    /// A small config for this method over `targets` (what `graft methods` counts parameters with).
    static func exampleConfig(targets: [String]) -> [String: Any]
    /// Checks method-specific keys once, before any layer is built.
    static func validate(_ config: AdapterConfig) throws
    /// Tensors shared by all of the adapter's layers (VeRA's projections), under their PEFT keys; none by default.
    static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)]
    /// The shared tensors given each target's module path (FRoD groups its bases by role); by default
    /// ``sharedTensors(for:config:state:)`` of the layers alone.
    static func sharedTensors(forTargets targets: [(path: String, layer: Linear)], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)]
    /// Whether the shared tensor under `key` holds integers PEFT stores as int64 (FRoD's sparse positions); false
    /// by default.
    static func sharedTensorIsInteger(_ key: String) -> Bool
    /// Whether ``sharedTensors(for:config:state:)`` draws exactly what PEFT draws (PyTorch's generator), so a
    /// file without them (saved with `save_projection: false`) still loads; false by default.
    static var regeneratesSharedTensors: Bool { get }
    /// The adapter for the Linear at `path`.
    static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                     shared: [String: Tensor]) throws -> any LinearAdapterMethod
    /// What the method does during training beyond its forward pass (a regularizer, work after each update),
    /// built once the adapter's layers exist; none by default.
    static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)?
    /// The module paths the adapter targets when the method chooses them itself rather than by `target_modules`
    /// (X-LoRA: every module one of its LoRA experts adapts); nil (the default) matches `target_modules`.
    static func targetPaths(config: AdapterConfig, root: Module) throws -> Set<String>?
    /// Called once the adapter's layers are attached to `root`, for model-level parts (X-LoRA's scaling pass);
    /// nothing by default.
    static func didAttach(_ adapter: NamedAdapter, root: Module) throws
    /// Called before the adapter is removed from `root`; undoes ``didAttach(_:root:)``. Nothing by default.
    static func willDetach(_ adapter: NamedAdapter, root: Module)
    /// The `adapter_config.json` object saved for `adapter`, given the config's own; unchanged by default (X-LoRA
    /// writes its experts' resolved directories).
    static func exportedConfigJSON(_ json: [String: Any], adapter: NamedAdapter) -> [String: Any]
    /// The config key holding the number of tasks when the method routes each example by its task id
    /// (``AdaptedModel/setTaskIDs(_:)``: Poly's and MTLoRA's `n_tasks`); nil (the default) for methods that ignore
    /// task ids.
    static var taskCountKey: String? { get }
}


extension AdapterMethodFactory {
    /// The checks most Linear methods share: the dropout under `dropoutKey` in [0, 1), `bias` "none" (Graft trains
    /// no base biases through these methods), and no `fan_in_fan_out` (a Conv1D layout Graft's models do not have).
    static func validateDropoutBiasAndLayout(_ config: AdapterConfig, dropoutKey: String) throws {
        let p = try config.double(dropoutKey, default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): '\(dropoutKey)' must be in [0, 1), got \(p)") }
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): 'bias' = \(bias) is not supported (only \"none\")")
        }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
    }

    public static var mergeable: Bool { true }
    public static var regeneratesSharedTensors: Bool { false }

    public static func sharedTensors(forTargets targets: [(path: String, layer: Linear)], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        try sharedTensors(for: targets.map(\.layer), config: config, state: state)
    }

    public static func sharedTensorIsInteger(_ key: String) -> Bool { false }

    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] { [] }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? { nil }

    public static func targetPaths(config: AdapterConfig, root: Module) throws -> Set<String>? { nil }

    public static func didAttach(_ adapter: NamedAdapter, root: Module) throws {}

    public static func willDetach(_ adapter: NamedAdapter, root: Module) {}

    public static func exportedConfigJSON(_ json: [String: Any], adapter: NamedAdapter) -> [String: Any] { json }

    public static var taskCountKey: String? { nil }

    /// `r` and the alpha (under `alphaKey`) for `path`, after `rank_pattern` / `alpha_pattern`.
    static func rankAndAlpha(_ config: AdapterConfig, path: String, alphaKey: String) throws -> (Int, Float) {
        let defaultRank = try config.int("r", default: 8)
        let defaultAlpha = try config.double(alphaKey, default: 8)
        let r = try config.patternSize("rank_pattern", path: path, default: defaultRank)
        let alpha = TargetMatcher.patternValue(try config.patternMap("alpha_pattern"), path: path) ?? defaultAlpha
        guard r > 0 else { throw GraftError.invalid("\(config.source): rank for '\(path)' must be positive, got \(r)") }
        return (r, Float(alpha))
    }

    /// Throws for options Graft does not implement when they are switched on.
    static func rejectUnsupported(_ config: AdapterConfig, _ flags: [String], rankDropout: Bool) throws {
        for flag in flags where try config.bool(flag, default: false) {
            throw GraftError(.unsupported, "\(config.source): '\(flag)' is not supported")
        }
        if rankDropout {
            for key in ["rank_dropout", "module_dropout"] where try config.double(key, default: 0) != 0 {
                throw GraftError(.unsupported, "\(config.source): '\(key)' is not supported yet (use 0)")
            }
        }
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
    }
}

/// LoRA and DoRA (`peft_type: "LORA"`, `use_dora`).
public enum LoRAFactory: AdapterMethodFactory {
    public static let peftType = "LORA"
    public static let family = "weight-delta (low rank)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "lora_alpha": 16, "target_modules": targets] }

    /// LoRA's options beyond r / α / dropout that Graft honours (each in `LoRA/`), as `graft methods` lists them;
    /// PEFT's others are refused by name.
    public static let honouredOptions = [
        "use_rslora", "use_dora", "init_lora_weights (true, false, gaussian, olora, pissa, milora, loftq; corda, eva, lora_ga from the first init_batches training batches of an added adapter)",
        "eva_config", "lora_ga_config", "corda_config", "lora_bias",
        "trainable_token_indices", "target_parameters", "kasa_config", "alora_invocation_tokens", "layer_replication", "velora_config",
        "ensure_weight_tying", "train_a",
        "rank_pattern", "alpha_pattern", "arrow_config (PEFT's Arrow router over loaded LoRA adapters, with GenKnowSub)",
    ]

    public static func validate(_ config: AdapterConfig) throws {
        try validateCommon(config)
        try ALoRAActivation.validate(config)
        try VeLoRAOptions.validate(config)
        if try ArrowOptions.parse(config) != nil {
            if try config.bool("use_dora", default: false) || config.value("train_a") != nil && !(try config.bool("train_a", default: true)) {
                throw GraftError(.unsupported, "\(config.source): an Arrow router (arrow_config) is plain LoRA; use_dora and train_a false do not apply")
            }
        }
        if config.value("train_a") != nil, !(try config.bool("train_a", default: true)) {
            // A frozen: asymmetric LoRA (AsymmetricLoRA.swift), which is how that method is saved.
            return try AsymmetricLoRAFactory.validate(config)
        }
        if try config.bool("use_qalora", default: false) { return try QALoRALayer.validate(config) }
        // Booleans, "gaussian", or the initializations from W of PiSSA.swift / MiLoRA.swift / CorDA.swift / OLoRA.swift.
        let svdInit = try SVDInitialization.parse(config.value("init_lora_weights"), source: config.source)
        if let svdInit {
            if try config.bool("use_dora", default: false) {
                throw GraftError(.unsupported, "\(config.source): init_lora_weights \(svdInit) cannot be combined with use_dora yet")
            }
            if svdInit == .corda { _ = try CorDAOptions.method(config) }
        }
        let usesDoRA = try config.bool("use_dora", default: false)
        if (config.value("init_lora_weights") as? String) == "eva" {
            _ = try EVAOptions.parse(config)
            if usesDoRA { throw GraftError(.unsupported, "\(config.source): init_lora_weights \"eva\" cannot be combined with use_dora yet") }
        }
        // PEFT writes lora_ga_config / eva_config beside any init (a converted LoRA-GA file keeps its lora_ga_config);
        // only those inits read them.
        if (config.value("init_lora_weights") as? String) != "lora_ga" { config.acknowledge("lora_ga_config") }
        if (config.value("init_lora_weights") as? String) == "loftq" {
            _ = try LoftQOptions.parse(config)
            let kasa = try KaSAOptions.parse(config)
            if usesDoRA || kasa != nil {
                throw GraftError(.unsupported, "\(config.source): init_lora_weights \"loftq\" cannot be combined with use_dora or kasa_config")
            }
        }
        if (config.value("init_lora_weights") as? String) == "lora_ga" {
            _ = try LoRAGAOptions.parse(config)
            if usesDoRA { throw GraftError(.unsupported, "\(config.source): init_lora_weights \"lora_ga\" cannot be combined with use_dora yet") }
        }
        if try KaSAOptions.parse(config) != nil, svdInit != nil || usesDoRA {
            throw GraftError(.unsupported, "\(config.source): 'kasa_config' cannot be combined with use_dora or init_lora_weights \(JSONScalar.describe(config.value("init_lora_weights")))")
        }
        // PEFT's own rules for lora_bias (LoraConfig.__post_init__).
        if try config.bool("lora_bias", default: false) {
            if svdInit != nil || JSONScalar.isBool(config.value("init_lora_weights") ?? true) == false {
                throw GraftError(.unsupported, "\(config.source): 'lora_bias' = true needs init_lora_weights true or false (as in PEFT), got \(JSONScalar.describe(config.value("init_lora_weights")))")
            }
            if try config.bool("use_dora", default: false) {
                throw GraftError(.unsupported, "\(config.source): 'lora_bias' = true cannot be combined with use_dora (as in PEFT)")
            }
        }
    }

    /// The checks LoRA and its variants share: rank, dropout, bias, fan_in_fan_out.
    static func validateCommon(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        try validateDropoutBiasAndLayout(config, dropoutKey: "lora_dropout")
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        if config.value("train_a") != nil, !(try config.bool("train_a", default: true)) {
            return try AsymmetricLoRAFactory.make(for: layer, path: path, config: config, state: state, shared: shared)
        }
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "lora_alpha")
        if try config.bool("use_qalora", default: false) {
            return try QALoRALayer(base: layer, rank: r, alpha: alpha, useRSLoRA: try config.bool("use_rslora", default: false),
                                   dropout: Float(try config.double("lora_dropout", default: 0)),
                                   groupSize: try config.int("qalora_group_size", default: 16),
                                   initLoraWeights: JSONScalar.bool(config.value("init_lora_weights")) ?? true,
                                   state: state, path: "\(config.source): \(path)")
        }
        let svdInit = try SVDInitialization.parse(config.value("init_lora_weights"), source: config.source)
        if let arrow = try ArrowOptions.parse(config) {
            let own = LoRALayer(base: layer, rank: r, alpha: alpha, useRSLoRA: try config.bool("use_rslora", default: false),
                                dropout: 0, useDoRA: false, initLoraWeights: true, state: state)
            return try ArrowLoRALayer.make(for: layer, path: path, own: own, options: arrow, state: state, source: config.source)
        }
        let lora = LoRALayer(base: layer, rank: r, alpha: alpha,
                             useRSLoRA: try config.bool("use_rslora", default: false),
                             dropout: Float(try config.double("lora_dropout", default: 0)),
                             useDoRA: try config.bool("use_dora", default: false),
                             initLoraWeights: JSONScalar.bool(config.value("init_lora_weights")) ?? true,
                             gaussianA: (config.value("init_lora_weights") as? String) == "gaussian",
                             bias: try config.bool("lora_bias", default: false),
                             state: state)
        switch svdInit {
        case .pissa?: try lora.initializeFromWeightSVD(base: layer, minor: false, path: "\(config.source): \(path)")
        case .milora?: try lora.initializeMinorComponents(base: layer, path: "\(config.source): \(path)")
        case .olora?: try lora.initializeOLoRA(base: layer, path: "\(config.source): \(path)")
        case .corda?, nil: break  // CorDA waits for AdaptedModel.initializeCorDA and its data.
        }
        if (config.value("init_lora_weights") as? String) == "loftq" {
            try lora.initializeLoftQ(base: layer, options: try LoftQOptions.parse(config), path: "\(config.source): \(path)")
        }
        if try KaSAOptions.parse(config) != nil { try lora.initializeKaSA(base: layer, path: "\(config.source): \(path)") }
        if let options = try VeLoRAOptions.parse(config) { lora.velora = VeLoRAState(inFeatures: layer.inFeatures, options: options, rng: &state.rng) }
        return lora
    }

    /// KaSA's regularizers (`KaSA.swift`); none for other LoRA.
    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        guard let options = try KaSAOptions.parse(adapter.config) else { return nil }
        return KaSARegularizer(layers: adapter.layers.compactMap { $0.adapter as? LoRALayer }, options: options)
    }
}

/// The methods GraftAdapters defines, by `peft_type`: the built-in part of every ``AdapterMethodTable``.
public enum AdapterRegistry {
    /// The factories, keyed by upper-case `peft_type`.
    public static let factories: [String: any AdapterMethodFactory.Type] = [
        LoRAFactory.peftType: LoRAFactory.self,
        IA3Factory.peftType: IA3Factory.self,
        LoHaFactory.peftType: LoHaFactory.self,
        LoKrFactory.peftType: LoKrFactory.self,
        VeRAFactory.peftType: VeRAFactory.self,
        HRAFactory.peftType: HRAFactory.self,
        MiSSFactory.peftType: MiSSFactory.self,
        RoAdFactory.peftType: RoAdFactory.self,
        AdaLoRAFactory.peftType: AdaLoRAFactory.self,
        SHiRAFactory.peftType: SHiRAFactory.self,
        OFTFactory.peftType: OFTFactory.self,
        VBLoRAFactory.peftType: VBLoRAFactory.self,
        C3AFactory.peftType: C3AFactory.self,
        RandLoRAFactory.peftType: RandLoRAFactory.self,
        BOFTFactory.peftType: BOFTFactory.self,
        FourierFTFactory.peftType: FourierFTFactory.self,
        PolyFactory.peftType: PolyFactory.self,
        ETHERFactory.peftType: ETHERFactory.self,
        ETHERPlusFactory.peftType: ETHERPlusFactory.self,
        MoSFactory.peftType: MoSFactory.self,
        LoRAXSFactory.peftType: LoRAXSFactory.self,
        AsymmetricLoRAFactory.peftType: AsymmetricLoRAFactory.self,
        SVFTFactory.peftType: SVFTFactory.self,
        RoSAFactory.peftType: RoSAFactory.self,
        GLoRAFactory.peftType: GLoRAFactory.self,
        DeLoRAFactory.peftType: DeLoRAFactory.self,
        HiRAFactory.peftType: HiRAFactory.self,
        TinyLoRAFactory.peftType: TinyLoRAFactory.self,
        PVeRAFactory.peftType: PVeRAFactory.self,
        UniLoRAFactory.peftType: UniLoRAFactory.self,
        GraLoRAFactory.peftType: GraLoRAFactory.self,
        BEFTFactory.peftType: BEFTFactory.self,
        PEANuTFactory.peftType: PEANuTFactory.self,
        DEFTFactory.peftType: DEFTFactory.self,
        SuperTuningFactory.peftType: SuperTuningFactory.self,
        WaveFTFactory.peftType: WaveFTFactory.self,
        LilyFactory.peftType: LilyFactory.self,
        PSOFTFactory.peftType: PSOFTFactory.self,
        FroDFactory.peftType: FroDFactory.self,
        OSFFactory.peftType: OSFFactory.self,
        AdaMSSFactory.peftType: AdaMSSFactory.self,
        BitFitFactory.peftType: BitFitFactory.self,
        SpIELFactory.peftType: SpIELFactory.self,
        TRPTSFactory.peftType: TRPTSFactory.self,
        NeuroAdaFactory.peftType: NeuroAdaFactory.self,
        DSEEFactory.peftType: DSEEFactory.self,
        ID3Factory.peftType: ID3Factory.self,
        SPTFactory.peftType: SPTFactory.self,
        IncreLoRAFactory.peftType: IncreLoRAFactory.self,
        TriAdaptLoRAFactory.peftType: TriAdaptLoRAFactory.self,
        TAPSFactory.peftType: TAPSFactory.self,
        SelectiveLoRAFactory.peftType: SelectiveLoRAFactory.self,
        LoSiAFactory.peftType: LoSiAFactory.self,
    ]

    /// Methods that target modules other than Linear, keyed by `peft_type`.
    public static let moduleFactories: [String: any ModuleAdapterFactory.Type] = [
        LNTuningFactory.peftType: LNTuningFactory.self,
        TrainableTokensFactory.peftType: TrainableTokensFactory.self,
        PromptTuningFactory.peftType: PromptTuningFactory.self,
        PTuningFactory.peftType: PTuningFactory.self,
        PrefixTuningFactory.peftType: PrefixTuningFactory.self,
        BottleneckSequentialFactory.peftType: BottleneckSequentialFactory.self,
        BottleneckDoubleSequentialFactory.peftType: BottleneckDoubleSequentialFactory.self,
        BottleneckParallelFactory.peftType: BottleneckParallelFactory.self,
        LoReFTFactory.peftType: LoReFTFactory.self,
        AdaptionPromptFactory.peftType: AdaptionPromptFactory.self,
        MultitaskPromptTuningFactory.peftType: MultitaskPromptTuningFactory.self,
        CPTFactory.peftType: CPTFactory.self,
        CartridgeFactory.peftType: CartridgeFactory.self,
        SparseAdapterFactory.peftType: SparseAdapterFactory.self,
    ]
}

/// One row of `graft methods`.
public struct MethodSummary: Sendable {
    /// `peft_type`.
    public var peftType: String
    /// Family.
    public var family: String
    /// How the output compares with Hugging Face PEFT's, as the parity tests measure it.
    public var peftParity: PEFTParity
    /// Folds into the base weights.
    public var mergeable: Bool
    /// Trainable parameters with the example config on the given targets (nil when it does not apply).
    public var trainableParameters: Int?
    /// Why the example config did not apply, if it did not.
    public var note: String?
    /// The example config the count was taken with (`peft_type` included), as adapter_config.json would hold it:
    /// JSON text with sorted keys.
    public var exampleConfigJSON: String = "{}"
}
