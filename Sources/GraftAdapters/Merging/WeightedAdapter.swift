import Foundation
import GraftTensor

/// What ``AdaptedModel/addWeightedAdapter(_:combining:)`` made.
public struct CombinationReport {
    /// The new adapter (attached, not activated: PEFT leaves the active adapter as it was).
    public let adapter: NamedAdapter
    /// The combination type applied (`linear` when a single adapter was given, as in PEFT).
    public let type: CombinationType
    /// The new adapter's rank (`r`, also its `lora_alpha`, so its scaling is 1 as in PEFT); 0 for IA³.
    public let rank: Int
    /// DARE only: the fraction of entries its random masks kept (expected: `density`); nil for other types.
    public let keptFraction: Double?
}

extension AdaptedModel {
    /// PEFT's `add_weighted_adapter`: combines the named LoRA adapters into a new adapter `name` (IA³ adapters
    /// combine as `IA3Model.add_weighted_adapter` does, see `IA3Combination.swift`).
    ///
    /// The new adapter takes the first source's config with `r = lora_alpha =` the new rank (the largest source
    /// rank or `svdRank` for SVD types, their sum for `cat`, the common rank otherwise), `target_modules` the
    /// union of the sources', and empty rank/alpha patterns, exactly as PEFT 0.21 builds it; its tensors follow
    /// PEFT's conventions (see ``CombinationType``). The previously active adapter stays active.
    ///
    /// Throws, naming the adapter or field at fault, for an unknown or non-LoRA (or DoRA) source, a taken name,
    /// mismatched weights, ranks that `linear`-like types cannot combine, or a missing `density`.
    @discardableResult
    public func addWeightedAdapter(_ name: String, combining request: AdapterCombination) throws -> CombinationReport {
        try request.validate()
        guard !adapters.contains(where: { $0.name == name }) else {
            throw GraftError.invalid("an adapter named '\(name)' already exists (choose a new adapter_name for the combination)")
        }
        let named = try request.adapters.map { try adapter($0) }
        if named.contains(where: { $0.config.peftType == "IA3" }) {
            return try addWeightedIA3Adapter(name, sources: named, request: request)
        }
        let sources = try request.adapters.map { try combinableSource($0) }
        let type = request.effectiveType
        let newRank = try Self.combinedRank(sources, request: request, type: type)
        let config = try Self.combinedConfig(sources, rank: newRank)
        let previouslyActive = activeAdapter
        let created = try addAdapter(name, config: config)
        created.markWeightsLoaded()
        do {
            let keptFraction = try fillCombination(created, sources: sources, request: request, type: type, rank: newRank)
            if let previouslyActive { try setActiveAdapter(previouslyActive) }
            return CombinationReport(adapter: created, type: type, rank: newRank, keptFraction: keptFraction)
        } catch {
            try? deleteAdapter(name)
            if let previouslyActive { try? setActiveAdapter(previouslyActive) }
            throw error
        }
    }

    /// The source adapter `name`, if it is a combinable LoRA adapter.
    private func combinableSource(_ name: String) throws -> NamedAdapter {
        let a = try adapter(name)
        guard a.config.peftType == "LORA" else {
            throw GraftError(.unsupported, "adapter '\(name)' is \(a.config.peftType): add_weighted_adapter combines LoRA adapters")
        }
        for (path, _, layer) in a.layers {
            guard let lora = layer as? LoRALayer else {
                throw GraftError(.unsupported, "adapter '\(name)': layer \(path) is not a plain LoRA layer")
            }
            guard lora.activation == nil else {
                throw GraftError(.unsupported, "adapter '\(name)' is aLoRA (alora_invocation_tokens): its update is gated per token, so it cannot be combined as a weight")
            }
            guard lora.magnitude == nil else {
                throw GraftError(.unsupported, "adapter '\(name)' uses DoRA (use_dora): its magnitude vector cannot be combined")
            }
            guard lora.initialFactors == nil else {
                throw GraftError(.unsupported, "adapter '\(name)' has an SVD initialization (PiSSA/MiLoRA/CorDA) still applied; save and reload it as plain LoRA first")
            }
            guard lora.quantizationError == nil else {
                throw GraftError(.unsupported, "adapter '\(name)' is a LoftQ adapter over Graft's quantized base (init_lora_weights \"loftq\"); its update is not a plain LoRA delta on W")
            }
        }
        return a
    }

    /// PEFT's new rank: the common rank, the sum (`cat`) or `svd_rank ?? max` (SVD types); each source counts
    /// with its largest layer rank (`rank_pattern` included).
    private static func combinedRank(_ sources: [NamedAdapter], request: AdapterCombination, type: CombinationType) throws -> Int {
        let ranks = sources.map { a in a.layers.compactMap { ($0.adapter as? LoRALayer)?.rank }.max() ?? 0 }
        if type.needsEqualRanks {
            guard Set(ranks).count == 1, let r = ranks.first else {
                let listed = zip(sources, ranks).map { "\($0.name): r=\($1)" }.joined(separator: ", ")
                throw GraftError.invalid("combination_type '\(type.rawValue)' needs adapters of equal rank, got \(listed) (use cat or an svd type)")
            }
            return r
        }
        if type == .cat { return ranks.reduce(0, +) }
        let rank = request.svdRank ?? ranks.max() ?? 0
        // Checked before the new adapter is allocated: a truncated SVD cannot have more factors than a layer's size.
        for a in sources {
            for (path, linear, _) in a.layers where rank > min(linear.inFeatures, linear.outFeatures) {
                throw GraftError.invalid("svd_rank \(rank) exceeds the rank \(min(linear.inFeatures, linear.outFeatures)) a \(linear.outFeatures)×\(linear.inFeatures) delta can have at \(path) (adapter '\(a.name)')")
            }
        }
        return rank
    }

    /// The first source's config with PEFT's replacements (`r`, `lora_alpha`, `target_modules`, patterns).
    private static func combinedConfig(_ sources: [NamedAdapter], rank: Int) throws -> AdapterConfig {
        let first = sources[0].config
        var json = first.json
        json["r"] = rank
        json["lora_alpha"] = rank
        json["rank_pattern"] = [String: Any]()
        json["alpha_pattern"] = [String: Any]()
        json["target_modules"] = try unionOfTargets(sources)
        for a in sources where a.config.json["target_parameters"].map({ !($0 is NSNull) }) ?? false {
            throw GraftError(.unsupported, "adapter '\(a.name)' targets parameters (target_parameters): add_weighted_adapter does not combine those")
        }
        try checkModulesToSave(sources)
        let config = try AdapterConfig(json: json, source: "add_weighted_adapter(\(sources.map(\.name).joined(separator: ", ")))")
        // The tensors are written below, so the initialization options cannot matter.
        config.acknowledge("init_weights", "init_lora_weights")
        return config
    }

    /// PEFT refuses sources that train the same `modules_to_save` module: such copies cannot be combined.
    static func checkModulesToSave(_ sources: [NamedAdapter]) throws {
        var seen: [String: String] = [:]
        for a in sources {
            for m in a.config.modulesToSave {
                if let other = seen[m] {
                    throw GraftError.invalid("adapters '\(other)' and '\(a.name)' both train module '\(m)' (modules_to_save): such modules cannot be combined")
                }
                seen[m] = a.name
            }
        }
    }

    /// `target_modules` of the combination: the union of name lists (first-seen order), the regexes joined as
    /// `(a)|(b)`, or `all-linear`; mixing kinds is an error, as in PEFT.
    static func unionOfTargets(_ sources: [NamedAdapter]) throws -> Any {
        var names: [String] = [], regexes: [String] = [], allLinear = 0
        for a in sources {
            switch a.config.targetModules {
            case .names(let list): for n in list where !names.contains(n) { names.append(n) }
            case .regex(let r): regexes.append(r)
            case .allLinear: allLinear += 1
            }
        }
        let kinds = (names.isEmpty ? 0 : 1) + (regexes.isEmpty ? 0 : 1) + (allLinear == 0 ? 0 : 1)
        guard kinds <= 1 else {
            let listed = sources.map { "\($0.name): \($0.config.targetModules)" }.joined(separator: "; ")
            throw GraftError.invalid("target_modules of the adapters mix lists and strings (\(listed)); PEFT cannot combine those")
        }
        if allLinear > 0 { return "all-linear" }
        if !regexes.isEmpty { return regexes.count == 1 ? regexes[0] : regexes.map { "(\($0))" }.joined(separator: "|") }
        return names
    }

    /// Writes the combined factors into every layer of `created`; returns DARE's kept fraction.
    private func fillCombination(_ created: NamedAdapter, sources: [NamedAdapter], request: AdapterCombination,
                                 type: CombinationType, rank: Int) throws -> Double? {
        let byPath: [[String: LoRALayer]] = sources.map { a in
            Dictionary(a.layers.compactMap { l in (l.adapter as? LoRALayer).map { (l.path, $0) } }, uniquingKeysWith: { x, _ in x })
        }
        var merger = TaskVectorMerge(sparsification: type.sparsification, electSign: type.electsSign,
                                     density: request.density ?? 1, signMethod: request.majoritySignMethod)
        var rng = GraftRNG(seed: request.seed)
        for (path, _, layer) in created.layers {
            guard let target = layer as? LoRALayer else {
                throw GraftError(.internalError, "combined adapter '\(created.name)': layer \(path) is not a LoRA layer")
            }
            target.loraA.pointer.update(repeating: 0, count: target.loraA.count)
            target.loraB.pointer.update(repeating: 0, count: target.loraB.count)
            // PEFT skips a source that does not adapt this module.
            let parts: [LoRAPart] = zip(sources.indices, request.weights).compactMap { i, w in
                byPath[i][path].map { LoRAPart(adapter: sources[i].name, layer: $0, weight: w) }
            }
            if parts.isEmpty { continue }
            switch type {
            case .cat: try Self.concatenate(parts, into: target, path: path)
            case _ where type.usesSVD:
                try Self.factorBySVD(parts, into: target, path: path, rank: rank, clamp: request.svdClamp,
                                     copaDensity: type == .copa ? request.density ?? 1 : nil, merger: &merger, rng: &rng)
            default: try Self.combineFactors(parts, into: target, path: path, merger: &merger, rng: &rng)
            }
            for t in [target.loraA, target.loraB] {
                for i in 0..<t.count where !t.pointer[i].isFinite {
                    throw GraftError(.invalidArgument, "combined adapter '\(created.name)': \(path) has a non-finite entry (the sources hold NaN or Inf)")
                }
            }
        }
        return merger.drawnEntries > 0 ? Double(merger.keptEntries) / Double(merger.drawnEntries) : nil
    }
}

/// One source LoRA layer at one module path, with its weight in the combination.
struct LoRAPart {
    /// The source adapter's name (for errors).
    let adapter: String
    /// Its layer at this path.
    let layer: LoRALayer
    /// Its weight in the combination.
    let weight: Double
}
