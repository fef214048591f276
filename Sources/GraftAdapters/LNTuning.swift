import GraftModels
import GraftTensor

/// LN tuning (Zhao et al., 2023): trainable copies of selected LayerNorm/RMSNorm scales and shifts.
/// PEFT keys `ln_tuning_layers.weight` / `.bias`.
public final class LNTuningLayer: ModuleAdapterMethod, NormAdapter {
    public let state: AdapterState
    public let weight: Tensor
    public let bias: Tensor?
    let module: Module

    init(module: Module, state: AdapterState) throws {
        self.state = state
        self.module = module
        if let ln = module as? LayerNorm {
            weight = ln.weight.copy().requiringGrad()
            bias = ln.bias.copy().requiringGrad()
        } else if let rms = module as? RMSNorm {
            weight = rms.weight.copy().requiringGrad()
            bias = nil
        } else {
            throw GraftError(.internalError, "LN tuning on a \(module.typeName)")
        }
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("ln_tuning_layers.weight", weight)] + (bias.map { [("ln_tuning_layers.bias", $0)] } ?? [])
    }

    public func attach() {
        (module as? LayerNorm)?.adapters.append(self)
        (module as? RMSNorm)?.adapters.append(self)
    }

    public func detach() {
        (module as? LayerNorm)?.adapters.removeAll { $0 === self }
        (module as? RMSNorm)?.adapters.removeAll { $0 === self }
    }

    private var targets: [Tensor] {
        if let ln = module as? LayerNorm { return [ln.weight, ln.bias] }
        if let rms = module as? RMSNorm { return [rms.weight] }
        return []
    }

    public func merge() -> [Tensor] {
        let saved = targets.map { $0.copy() }
        for (t, v) in zip(targets, [weight] + (bias.map { [$0] } ?? [])) { t.pointer.update(from: v.pointer, count: t.count) }
        return saved
    }

    public func unmerge(_ saved: [Tensor]) {
        for (t, v) in zip(targets, saved) { t.pointer.update(from: v.pointer, count: t.count) }
    }

    public func load(_ name: String, from tensor: Tensor) throws { try loadNamedParameter(name, from: tensor) }
}

/// LN tuning (`peft_type: "LN_TUNING"`): `target_modules` names LayerNorm/RMSNorm modules.
public enum LNTuningFactory: ModuleAdapterFactory {
    public static let peftType = "LN_TUNING"
    public static let family = "selective (norm parameters)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["target_modules": ["LayerNorm", "input_layernorm", "post_attention_layernorm", "norm"]] }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        guard module is LayerNorm || module is RMSNorm else { return nil }
        return try LNTuningLayer(module: module, state: state)
    }
}
