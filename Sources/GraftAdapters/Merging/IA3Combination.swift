import Foundation
import GraftTensor

extension AdaptedModel {
    /// PEFT's `IA3Model.add_weighted_adapter`: the new adapter's vector at each layer is `Σ w_t · l_t` over the
    /// sources that adapt it (zero where none does, as PEFT zeroes before adding), with the first source's config,
    /// `target_modules` and `feedforward_modules` the sources' unions.
    ///
    /// PEFT 0.21's loop returns after the first module it visits, so there the new adapter keeps its
    /// initialization; Graft does what the code evidently means. IA³ has no rank and no pruning: a
    /// `combination_type` other than linear (or the default svd), `density` or an SVD option is an error.
    func addWeightedIA3Adapter(_ name: String, sources: [NamedAdapter], request: AdapterCombination) throws -> CombinationReport {
        if let other = sources.first(where: { $0.config.peftType != "IA3" }) {
            throw GraftError(.unsupported, "adapter '\(other.name)' is \(other.config.peftType) and '\(sources[0].name)' is \(sources[0].config.peftType): only adapters of one method combine")
        }
        guard [.svd, .linear].contains(request.type), request.density == nil, request.svdRank == nil, request.svdClamp == nil else {
            throw GraftError.invalid("IA3 adapters combine linearly (PEFT's IA3 add_weighted_adapter takes only weights): drop combination_type '\(request.type.rawValue)', density and the svd options")
        }
        try Self.checkModulesToSave(sources)
        var json = sources[0].config.json
        json["target_modules"] = try Self.unionOfTargets(sources)
        json["feedforward_modules"] = try Self.unionOfFeedForward(sources)
        let config = try AdapterConfig(json: json, source: "add_weighted_adapter(\(sources.map(\.name).joined(separator: ", ")))")
        config.acknowledge("init_ia3_weights")
        let previouslyActive = activeAdapter
        let created = try addAdapter(name, config: config)
        do {
            let byPath: [[String: IA3Layer]] = sources.map { a in
                Dictionary(a.layers.compactMap { l in (l.adapter as? IA3Layer).map { (l.path, $0) } }, uniquingKeysWith: { x, _ in x })
            }
            for (path, _, layer) in created.layers {
                guard let target = layer as? IA3Layer else {
                    throw GraftError(.internalError, "combined adapter '\(name)': layer \(path) is not an IA3 layer")
                }
                let out = target.scale.pointer, n = target.scale.count
                out.update(repeating: 0, count: n)
                for (i, w) in request.weights.enumerated() {
                    guard let source = byPath[i][path] else { continue }
                    guard source.scale.shape == target.scale.shape else {
                        throw GraftError.invalid("adapter '\(sources[i].name)': \(path) scales the \(source.isFeedForward ? "input" : "output") but the combination scales the \(target.isFeedForward ? "input" : "output") (feedforward_modules differ)")
                    }
                    let p = source.scale.pointer, weight = Float(w)
                    for j in 0..<n { out[j] += p[j] * weight }
                }
                for j in 0..<n where !out[j].isFinite {
                    throw GraftError.invalid("combined adapter '\(name)': \(path) has a non-finite entry (the sources hold NaN or Inf)")
                }
            }
            if let previouslyActive { try setActiveAdapter(previouslyActive) }
            return CombinationReport(adapter: created, type: .linear, rank: 0, keptFraction: nil)
        } catch {
            try? deleteAdapter(name)
            if let previouslyActive { try? setActiveAdapter(previouslyActive) }
            throw error
        }
    }

    /// `feedforward_modules` of the combination: lists united, regexes joined as `(a)|(b)`, as PEFT does.
    static func unionOfFeedForward(_ sources: [NamedAdapter]) throws -> Any {
        var names: [String] = [], regexes: [String] = []
        for a in sources {
            switch a.config.json["feedforward_modules"] {
            case let list as [String]: for n in list where !names.contains(n) { names.append(n) }
            case let regex as String: regexes.append(regex)
            default: continue
            }
        }
        guard names.isEmpty || regexes.isEmpty else {
            throw GraftError.invalid("feedforward_modules of the adapters mix lists and strings; PEFT cannot combine those")
        }
        if !regexes.isEmpty { return regexes.count == 1 ? regexes[0] : regexes.map { "(\($0))" }.joined(separator: "|") }
        return names
    }
}
