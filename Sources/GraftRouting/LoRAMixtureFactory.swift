import GraftAdapters
import GraftModels
import GraftTensor

/// Mixtures of LoRA experts (`peft_type: "LORA_MOE"`, Graft's own type; see ``LoRAMixtureLayer``).
///
/// Keys: `r` (rank of each expert, 8), `lora_alpha` (8; scaling `α/r`), `num_experts` (4), `experts_pattern`
/// (pattern → experts, like `rank_pattern`) and `experts_per_layer` (a list indexed by the layer number in the
/// module path) for different expert counts per layer (MoLA), `routing` (`"soft"`, `"top_k"`, `"top_p"`),
/// `top_k` (2), `top_p` (0.5), `capacity_factor` (1.0 in top-k mode; 0 = unlimited), `gate_dropout` (0),
/// `normalize_gates` (true), `load_balancing_loss_weight`, `router_z_loss_weight`, `contrastive_loss_weight`
/// (all 0), `contrastive_temperature` (0.1), `contrastive_tokens` (32), `target_modules`.
public enum LoRAMixtureFactory: AdapterMethodFactory {
    public static let peftType = "LORA_MOE"
    public static let family = "routed mixture of LoRA experts (MoLoRA / SiRA / top-p / MoLA)"
    public static let mergeable = false

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 2, "lora_alpha": 4, "num_experts": 4, "routing": "top_k", "top_k": 2, "capacity_factor": 1.25,
         "load_balancing_loss_weight": 0.01, "target_modules": targets]
    }

    /// The routing options from `config`; throws naming the key and value out of range.
    public static func options(_ config: AdapterConfig) throws -> MixtureOptions {
        var o = MixtureOptions()
        let routing = try config.string("routing") ?? "soft"
        guard let mode = ExpertRoutingMode(rawValue: routing) else {
            throw GraftError.invalid("\(config.source): 'routing' must be one of \(ExpertRoutingMode.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")), got \"\(routing)\"")
        }
        o.mode = mode
        o.topK = try config.int("top_k", default: 2)
        guard o.topK >= 1 else { throw GraftError.invalid("\(config.source): 'top_k' must be ≥ 1, got \(o.topK)") }
        o.topP = Float(try config.double("top_p", default: 0.5))
        guard o.topP > 0, o.topP <= 1 else { throw GraftError.invalid("\(config.source): 'top_p' must be in (0, 1], got \(o.topP)") }
        let c = try config.double("capacity_factor", default: 1.0)
        guard c >= 0, c.isFinite else { throw GraftError.invalid("\(config.source): 'capacity_factor' must be ≥ 0, got \(c)") }
        o.capacityFactor = c > 0 ? Float(c) : nil
        o.gateDropout = Float(try config.double("gate_dropout", default: 0))
        guard o.gateDropout >= 0, o.gateDropout < 1 else {
            throw GraftError.invalid("\(config.source): 'gate_dropout' must be in [0, 1), got \(o.gateDropout)")
        }
        o.normalizeGates = try config.bool("normalize_gates", default: true)
        for (key, path) in [("load_balancing_loss_weight", \MixtureOptions.loadBalancingWeight),
                            ("router_z_loss_weight", \MixtureOptions.zLossWeight),
                            ("contrastive_loss_weight", \MixtureOptions.contrastiveWeight)] {
            let w = try config.double(key, default: 0)
            guard w >= 0, w.isFinite else { throw GraftError.invalid("\(config.source): '\(key)' must be ≥ 0, got \(w)") }
            o[keyPath: path] = Float(w)
        }
        o.contrastiveTemperature = Float(try config.double("contrastive_temperature", default: 0.1))
        guard o.contrastiveTemperature > 0 else {
            throw GraftError.invalid("\(config.source): 'contrastive_temperature' must be positive, got \(o.contrastiveTemperature)")
        }
        o.contrastiveTokens = try config.int("contrastive_tokens", default: 32)
        guard o.contrastiveTokens >= 1 else {
            throw GraftError.invalid("\(config.source): 'contrastive_tokens' must be ≥ 1, got \(o.contrastiveTokens)")
        }
        return o
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try options(config)
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let e = try config.int("num_experts", default: 4)
        guard e > 0 else { throw GraftError.invalid("\(config.source): 'num_experts' must be positive, got \(e)") }
        let p = try config.double("lora_dropout", default: 0)
        guard p == 0 else { throw GraftError(.unsupported, "\(config.source): 'lora_dropout' \(p) is not supported by LORA_MOE (use gate_dropout)") }
        if let list = config.value("experts_per_layer") {
            guard let values = list as? [Int], values.allSatisfy({ $0 > 0 }) else {
                throw GraftError.invalid("\(config.source): 'experts_per_layer' must be a list of positive integers, got \(list)")
            }
        }
    }

    /// The number of experts for the layer at `path`: `experts_pattern`, then `experts_per_layer`, then
    /// `num_experts`.
    public static func experts(_ config: AdapterConfig, path: String) throws -> Int {
        if TargetMatcher.patternValue(try config.patternMap("experts_pattern"), path: path) != nil {
            return try config.patternSize("experts_pattern", path: path, default: 1)
        }
        if let list = config.value("experts_per_layer") as? [Int] {
            guard let layer = path.split(separator: ".").compactMap({ Int($0) }).first else {
                throw GraftError.invalid("\(config.source): 'experts_per_layer' is set but '\(path)' has no layer number")
            }
            guard layer < list.count else {
                throw GraftError.invalid("\(config.source): 'experts_per_layer' \(list) has no entry for layer \(layer) ('\(path)')")
            }
            return list[layer]
        }
        return try config.int("num_experts", default: 4)
    }

    /// The hook that adds the layers' auxiliary losses while training (nil when every loss weight is 0).
    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        guard try options(adapter.config).needsAuxiliary else { return nil }
        return MixtureTrainingHook(layers: adapter.layers.compactMap { $0.adapter as? LoRAMixtureLayer })
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let r = try config.int("r", default: 8)
        return LoRAMixtureLayer(base: layer, path: path, experts: try experts(config, path: path), rank: r,
                                alpha: Float(try config.double("lora_alpha", default: 8)), options: try options(config),
                                state: state)
    }
}

extension AdapterMethodTable {
    /// Every method Graft has: GraftAdapters' own plus GraftRouting's expert mixtures (`LORA_MOE`, `XLORA`, `MOV`,
    /// `MTLORA`, `SMORE`) and MoE-base tuners (`ESFT`, `PERFT`).
    /// Sessions create their models with it.
    public static let all = AdapterMethodTable.builtIn.adding([LoRAMixtureFactory.self, XLoRAFactory.self, MoVFactory.self,
                                                               MTLoRAFactory.self, SMoREFactory.self])
        .adding(modules: [ESFTFactory.self, PERFTFactory.self, MoEPartialLoRAFactory.self])
}
