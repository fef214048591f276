import GraftModels
import GraftTensor

/// Cartridges (Eyuboglu et al., 2025), PEFT's `CartridgeEncoder`: a trained KV cache. Like prefix tuning, every
/// layer's `n` keys and values (`[n, layers · 2 · w]`, layer `l`'s keys at columns `2l·w`, values at `(2l+1)·w`,
/// `w = kvHeads · headDim`) precede every sequence as cached entries, and real tokens take positions `n...`; unlike
/// it, the table is the parameter itself (no projection), drawn N(0, 1), and its first `num_frozen_tokens` rows
/// (an attention sink) stay frozen. PEFT saves the whole table as `prompt_embeddings`.
public final class CartridgeLayer: ModuleAdapterMethod, PrefixAdapter {
    public let state: AdapterState
    let model: any PrefixHost
    /// The frozen first rows, `[num_frozen_tokens, layers · 2 · w]` (nil when none are frozen).
    public let frozen: Tensor?
    /// The trained rows, `[n − num_frozen_tokens, layers · 2 · w]`.
    public let trainable: Tensor

    init(model: any PrefixHost, virtualTokens n: Int, frozenTokens f: Int, state: AdapterState) {
        self.state = state
        self.model = model
        let width = model.prefixLayerCount * 2 * model.prefixWidth
        frozen = f > 0 ? Tensor.randomNormal([f, width], std: 1, rng: &state.rng) : nil
        trainable = Tensor.randomNormal([n - f, width], std: 1, rng: &state.rng).requiringGrad()
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var keyPrefix: String? { "" }
    public var mergeable: Bool { false }
    public var notMergeableReason: String { "it adds cached keys and values" }
    /// The trained rows only (the frozen ones are not parameters), under PEFT's parameter name.
    public var namedParameters: [(name: String, tensor: Tensor)] { [("trainable_embedding", trainable)] }
    /// PEFT's file: the whole table.
    public var exportedParameters: [(name: String, tensor: Tensor)] { [("prompt_embeddings", withNoGrad { table })] }
    public func attach() { model.prefixAdapters.append(self) }
    public func detach() { model.prefixAdapters.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    /// Frozen rows then trained rows, `[n, layers · 2 · w]`, recorded.
    var table: Tensor { frozen.map { concat([$0, trainable], dim: 0) } ?? trainable }

    public func load(_ name: String, from tensor: Tensor) throws {
        guard name == "prompt_embeddings" else {
            throw GraftError.format("unknown CARTRIDGE tensor '\(name)' (PEFT saves 'prompt_embeddings')")
        }
        let f = frozen?.shape[0] ?? 0, n = f + trainable.shape[0], width = trainable.shape[1]
        guard tensor.shape == [n, width] else {
            throw GraftError.format("'prompt_embeddings' has shape \(tensor.shape), expected \([n, width]) (check num_virtual_tokens, num_layers, token_dim)")
        }
        if let frozen { frozen.pointer.update(from: tensor.pointer, count: frozen.count) }
        trainable.pointer.update(from: tensor.pointer + f * width, count: trainable.count)
    }

    public func prefix(layer: Int) -> (keys: Tensor, values: Tensor) {
        let w = model.prefixWidth, t = table, n = t.shape[0]
        let perLayer = t.reshaped([n, model.prefixLayerCount * 2, w])
        return (perLayer.slice(dim: 1, (2 * layer)..<(2 * layer + 1)).reshaped([n, w]),
                perLayer.slice(dim: 1, (2 * layer + 1)..<(2 * layer + 2)).reshaped([n, w]))
    }
}

/// Cartridges (`CARTRIDGE`): `num_virtual_tokens`, `num_frozen_tokens` (default 1); `token_dim` is the key width
/// `kvHeads · headDim` (PEFT's GQA adjustment) and `num_layers` the model's. BERT encoders and Llama decoders, as
/// prefix tuning. PEFT's initialization from a prefilled text is a separate step there and here: write the cache
/// into the table, as `prefixesActLikeCachedTokens` does.
public enum CartridgeFactory: ModuleAdapterFactory {
    public static let peftType = "CARTRIDGE"
    public static let family = "input (trained KV cache)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["num_virtual_tokens": 8, "num_frozen_tokens": 1] }

    public static let actsOnInput = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        guard let host = module as? any PrefixHost else { return nil }
        let n = try config.int("num_virtual_tokens", default: 8)
        let f = try config.int("num_frozen_tokens", default: 1)
        guard n > 0 else { throw GraftError.invalid("\(config.source): 'num_virtual_tokens' must be positive, got \(n)") }
        guard f >= 0, f < n else {
            throw GraftError.invalid("\(config.source): 'num_frozen_tokens' is \(f); it must be in 0..<num_virtual_tokens (\(n)) so some rows train")
        }
        let dim = try config.int("token_dim", default: host.prefixWidth)
        guard dim == host.prefixWidth else {
            throw GraftError.invalid("\(config.source): token_dim \(dim) is not the model's key width \(host.prefixWidth) (kvHeads · headDim)")
        }
        let layers = try config.int("num_layers", default: host.prefixLayerCount)
        guard layers == host.prefixLayerCount else {
            throw GraftError.invalid("\(config.source): num_layers \(layers) is not the model's \(host.prefixLayerCount) layers")
        }
        let submodules = try config.int("num_transformer_submodules", default: 1)
        guard submodules == 1 else {
            throw GraftError(.unsupported, "\(config.source): num_transformer_submodules \(submodules) (encoder-decoder models) is not supported")
        }
        // num_attention_heads only splits token_dim into heads, the same layout either way.
        config.acknowledge("num_attention_heads")
        return CartridgeLayer(model: host, virtualTokens: n, frozenTokens: f, state: state)
    }
}
