import GraftModels
import GraftTensor

/// Prefix tuning (Li & Liang, 2021): learned keys and values prepended in every attention layer. PEFT stores
/// them as `prompt_embeddings` `[n, layers · 2 · w]`, layer `l`'s keys at columns `2l·w` and values at
/// `(2l+1)·w` (heads × head_dim inside), `w` the hidden size, or `kvHeads · headDim` under grouped-query attention
/// (PEFT's `token_dim` for such decoders). `prefix_projection` (an MLP reparameterization) is not supported yet.
public final class PrefixTuningLayer: VirtualTokenLayer, PrefixAdapter {
    let model: any PrefixHost

    init(model: any PrefixHost, virtualTokens: Int, state: AdapterState) {
        self.model = model
        super.init(host: model, rows: virtualTokens, width: model.prefixLayerCount * 2 * model.prefixWidth, state: state)
    }

    public override func attach() { model.prefixAdapters.append(self) }
    public override func detach() { model.prefixAdapters.removeAll { $0 === self } }

    public func prefix(layer: Int) -> (keys: Tensor, values: Tensor) {
        let w = model.prefixWidth, n = embeddings.shape[0]
        let perLayer = embeddings.reshaped([n, model.prefixLayerCount * 2, w])
        return (perLayer.slice(dim: 1, (2 * layer)..<(2 * layer + 1)).reshaped([n, w]),
                perLayer.slice(dim: 1, (2 * layer + 1)..<(2 * layer + 2)).reshaped([n, w]))
    }
}

/// Prefix tuning (`PREFIX_TUNING`): `num_virtual_tokens`; BERT encoders and Llama decoders.
public enum PrefixTuningFactory: ModuleAdapterFactory {
    public static let peftType = "PREFIX_TUNING"
    public static let family = "input (attention prefixes)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["num_virtual_tokens": 8] }

    public static let actsOnInput = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        if try config.bool("prefix_projection", default: false) {
            throw GraftError(.unsupported, "\(config.source): prefix_projection is not supported yet")
        }
        // encoder_hidden_size sizes the prefix projection only, which is off here; PEFT records the model's sizes.
        config.acknowledge("encoder_hidden_size", "num_attention_heads", "num_layers", "num_transformer_submodules")
        guard let host = module as? any PrefixHost else { return nil }
        let n = try config.int("num_virtual_tokens", default: 8)
        guard n > 0 else { throw GraftError.invalid("\(config.source): 'num_virtual_tokens' must be positive, got \(n)") }
        // PEFT sets token_dim to kvHeads · headDim for grouped-query decoders; accept either spelling.
        let dim = try config.int("token_dim", default: host.prefixWidth)
        guard dim == host.prefixWidth || dim == host.embeddingWidth else {
            throw GraftError.invalid("\(config.source): token_dim \(dim) fits neither the model's key width \(host.prefixWidth) nor its hidden size \(host.embeddingWidth)")
        }
        return PrefixTuningLayer(model: host, virtualTokens: n, state: state)
    }
}
