import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// LoRA's `target_parameters` (PEFT): LoRA applied to parameters named by suffix (`"value.weight"`,
/// `"attention.self.query.weight"`) rather than to modules. PEFT's `ParamWrapper` adds `s·B A` to the
/// parameter, which for the weight of a Linear layer is ordinary LoRA on that layer, under the same keys
/// (`<module path>.lora_A.weight`); Graft's models hold their 2-D weights in Linear layers, so that is the case
/// it takes. Entries that match nothing, or match a parameter that is not a Linear weight (a bias, an embedding
/// table, a norm), are errors naming them.
extension AdaptedModel {
    /// The paths of the Linear layers whose weights `config`'s `target_parameters` names (empty when the key is absent).
    func parameterTargetPaths(config: AdapterConfig) throws -> Set<String> {
        guard let value = config.value("target_parameters"), !(value is NSNull) else { return [] }
        guard let entries = value as? [String] else {
            throw GraftError.invalid("\(config.source): 'target_parameters' must be a list of parameter names, got \(JSONScalar.describe(value))")
        }
        let modules = Dictionary(root.namedModules().map { ($0.name, $0.module) }, uniquingKeysWith: { a, _ in a })
        let parameters = root.namedParameterShapes().map(\.name)
        var paths = Set<String>()
        for entry in entries {
            let hits = parameters.filter { $0 == entry || $0.hasSuffix("." + entry) }
            guard !hits.isEmpty else {
                throw GraftError.invalid("\(config.source): 'target_parameters' entry \"\(entry)\" matches no parameter; parameters include \(parameters.prefix(3).joined(separator: ", "))")
            }
            for hit in hits {
                let modulePath = hit.hasSuffix(".weight") ? String(hit.dropLast(".weight".count)) : nil
                guard let modulePath, modules[modulePath] is Linear else {
                    throw GraftError(.unsupported, "\(config.source): 'target_parameters' entry \"\(entry)\" matches \(hit), which is not the weight of a Linear layer (Graft applies target_parameters to Linear weights)")
                }
                paths.insert(modulePath)
            }
        }
        return paths
    }
}
