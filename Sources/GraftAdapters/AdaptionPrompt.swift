import Foundation
import GraftModels
import GraftTensor

/// LLaMA-Adapter (Zhang et al., 2023), PEFT's adaption prompt: in each of the top `adapter_layers` attention
/// blocks, `adapter_len` learned prompt vectors `P` `[1, len, hidden]` are projected by the block's own `k_proj`
/// and `v_proj` (no RoPE, no norm), and every query (rotated, as the block's) attends to them in a softmax of
/// their own: `g · softmax(q kᵀ / √d) v`, added to the block's attention before `o_proj`. The gate `g` starts at
/// zero, so a fresh adapter leaves the model unchanged. Grouped-query heads share the key/value heads as the
/// block's do. PEFT's keys: `base_model.model.model.layers.<i>.self_attn.adaption_prompt` and `.adaption_gate`.
public final class AdaptionPromptLayer: ModuleAdapterMethod, AttentionAdapter {
    public let state: AdapterState
    /// The attention block this adapter extends.
    public let attention: LlamaAttention
    /// The learned prompt, `[1, adapter_len, hidden]`, N(0, 1) at first as PEFT draws it.
    public let prompt: Tensor
    /// The zero-initialized gate, `[1]`.
    public let gate: Tensor

    init(attention: LlamaAttention, length: Int, state: AdapterState) {
        self.state = state
        self.attention = attention
        prompt = Tensor.randomNormal([1, length, attention.config.hiddenSize], std: 1, rng: &state.rng).requiringGrad()
        gate = Tensor(zeros: [1]).requiringGrad()
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var mergeable: Bool { false }
    public var notMergeableReason: String { "it adds a gated attention over learned prompts" }
    public var namedParameters: [(name: String, tensor: Tensor)] { [("adaption_prompt", prompt), ("adaption_gate", gate)] }
    public func attach() { attention.adapters.append(self) }
    public func detach() { attention.adapters.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    public func load(_ name: String, from tensor: Tensor) throws {
        try loadNamedParameter(name, from: tensor, hint: "adapter_len")
    }

    public func attentionOutput(query: Tensor, attention: LlamaAttention) -> Tensor {
        let rows = query.shape[0], n = prompt.shape[1], c = attention.config
        let p = prompt.reshaped([n, c.hiddenSize])
        // The block's projections, adapters on them included (as PEFT calls the wrapped module's k_proj / v_proj).
        let keys = attention.kProj.forward(p).reshaped([1, n, c.kvHeads * c.headDim])
        let values = attention.vProj.forward(p).reshaped([1, n, c.kvHeads * c.headDim])
        let k = rows == 1 ? keys : concat([Tensor](repeating: keys, count: rows), dim: 0)
        let v = rows == 1 ? values : concat([Tensor](repeating: values, count: rows), dim: 0)
        // Every query sees every prompt vector: no causal, padding or segment mask.
        let out = scaledDotProductAttention(query: query, key: k, value: v, heads: c.heads, kvHeads: c.kvHeads, mask: AttentionMask())
        return out * gate
    }
}

/// LLaMA-Adapter (`ADAPTION_PROMPT`): `adapter_len` prompt vectors in each of the top `adapter_layers` attention
/// blocks (`target_modules`: `"self_attn"`, PEFT's default for Llama). Llama decoders only, as PEFT.
public enum AdaptionPromptFactory: ModuleAdapterFactory {
    public static let peftType = "ADAPTION_PROMPT"
    public static let family = "attention (gated prompt attention, top layers)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["adapter_len": 10, "adapter_layers": 2] }

    /// It picks the top layers itself; `target_modules` names the attention blocks.
    public static let selectsLayers = true
    public static let requiresDecoder = true
    public static var mergeable: Bool { false }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let target: String
        switch config.value("target_modules") {
        case nil: target = "self_attn"
        case is NSNull: target = "self_attn"
        case let s as String: target = s
        case let other?: throw GraftError.invalid("\(config.source): 'target_modules' must be the name of the attention submodules (\"self_attn\"), got \(other)")
        }
        guard target == "self_attn" else {
            throw GraftError(.unsupported, "\(config.source): target_modules '\(target)' is not an attention block Graft adapts (Llama's is \"self_attn\")")
        }
        guard let attention = module as? LlamaAttention, path.hasSuffix("." + target) else { return nil }
        // PEFT has no defaults for these two: 0 stands for "not set".
        let length = try config.int("adapter_len", default: 0), layers = try config.int("adapter_layers", default: 0)
        let total = attention.config.layers
        guard length > 0 else {
            throw GraftError.invalid("\(config.source): 'adapter_len' must be a positive integer (PEFT has no default), got \(length)")
        }
        guard layers > 0, layers <= total else {
            throw GraftError.invalid("\(config.source): 'adapter_layers' is \(layers); the model has \(total) attention layers (1...\(total))")
        }
        guard attention.layerIndex >= total - layers else { return nil }
        return AdaptionPromptLayer(attention: attention, length: length, state: state)
    }
}
