import Foundation
import GraftModels
import GraftTensor

/// The methods an ``AdaptedModel`` can build, by `peft_type`: a value fixed when the model is created, so which
/// methods exist is decided by the code that links them, never by registration at run time. GraftAdapters'
/// own methods form ``builtIn``; modules that build on it (GraftRouting's expert mixtures) extend it with
/// ``adding(_:)`` into a table of their own.
public struct AdapterMethodTable: Sendable {
    /// Linear-layer factories, keyed by upper-case `peft_type`.
    public let linear: [String: any AdapterMethodFactory.Type]
    /// Factories of methods that attach to other modules, keyed by `peft_type`.
    public let modules: [String: any ModuleAdapterFactory.Type]

    /// The methods defined in GraftAdapters.
    public static let builtIn = AdapterMethodTable(linear: AdapterRegistry.factories, modules: AdapterRegistry.moduleFactories)

    /// A table of `linear` and `modules` factories.
    public init(linear: [String: any AdapterMethodFactory.Type], modules: [String: any ModuleAdapterFactory.Type]) {
        self.linear = linear
        self.modules = modules
    }

    /// This table with `factories` added (a factory never replaces one already in the table).
    public func adding(_ factories: [any AdapterMethodFactory.Type]) -> AdapterMethodTable {
        var linear = self.linear
        for f in factories where linear[f.peftType.uppercased()] == nil { linear[f.peftType.uppercased()] = f }
        return AdapterMethodTable(linear: linear, modules: modules)
    }

    /// This table with module-adapter `factories` added (a factory never replaces one already in the table).
    public func adding(modules factories: [any ModuleAdapterFactory.Type]) -> AdapterMethodTable {
        var modules = self.modules
        for f in factories where modules[f.peftType.uppercased()] == nil { modules[f.peftType.uppercased()] = f }
        return AdapterMethodTable(linear: linear, modules: modules)
    }

    /// Every known `peft_type`, sorted.
    public var knownTypes: [String] { (Array(linear.keys) + Array(modules.keys)).sorted() }

    /// The Linear-layer factory for `config.peftType`, or an error listing the known types.
    public func factory(for config: AdapterConfig) throws -> any AdapterMethodFactory.Type {
        guard let f = linear[config.peftType] else {
            throw GraftError(.unsupported, "\(config.source): unknown peft_type '\(config.peftType)' (known: \(knownTypes.joined(separator: ", ")))")
        }
        return f
    }

    /// Every method with its trainable-parameter count on `root` for `targets` (`graft methods`).
    public func summaries(root: Module, targets: [String]) -> [MethodSummary] {
        knownTypes.compactMap { type in
            let linearFactory = linear[type]
            let module = modules[type]
            guard linearFactory != nil || module != nil else { return nil }
            if module?.requiresDecoder == true, !(root is LlamaModel) {
                var json = module?.exampleConfig(targets: targets) ?? [:]
                json["peft_type"] = type
                return MethodSummary(peftType: type, family: module?.family ?? "", peftParity: PEFTParity.record(for: type),
                                     mergeable: false, trainableParameters: nil, note: "causal decoders only, e.g. --model smollm2",
                                     exampleConfigJSON: Self.jsonText(json))
            }
            var json = linearFactory?.exampleConfig(targets: targets) ?? module?.exampleConfig(targets: targets) ?? [:]
            json["peft_type"] = type
            let model = AdaptedModel(root: root, methods: self)
            var count: Int? = nil, note: String? = nil
            do {
                let a = try model.addAdapter("probe", config: AdapterConfig(json: json, source: type))
                count = a.parameterCount
                try model.deleteAdapter("probe")
            } catch let e as GraftError {
                note = e.message
            } catch {
                note = "\(error)"
            }
            return MethodSummary(peftType: type, family: linearFactory?.family ?? module?.family ?? "",
                                 peftParity: PEFTParity.record(for: type),
                                 mergeable: linearFactory?.mergeable ?? module?.mergeable ?? true,
                                 trainableParameters: count, note: note, exampleConfigJSON: Self.jsonText(json))
        }
    }

    /// `json` as sorted-key JSON text ("{}" if it does not serialize).
    static func jsonText(_ json: [String: Any]) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: json, options: [.sortedKeys]) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}
