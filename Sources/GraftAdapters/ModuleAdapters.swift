import GraftModels
import GraftTensor

/// An adapter method attached to a module other than Linear (a LayerNorm, an Embedding): its parameters under
/// PEFT's key names, attach/detach, and merge/unmerge into the module's own parameters.
public protocol ModuleAdapterMethod: AnyObject {
    /// The named adapter this belongs to.
    var state: AdapterState { get }
    /// Parameters by PEFT key suffix.
    var namedParameters: [(name: String, tensor: Tensor)] { get }
    /// Hooks the adapter into its module.
    func attach()
    /// Removes the hook.
    func detach()
    /// Writes the adapted values into the module's parameters; returns what `unmerge` needs to restore them.
    func merge() -> [Tensor]
    /// Restores the module's parameters saved by `merge`.
    func unmerge(_ saved: [Tensor])
    /// Replaces a parameter's values from a loaded state dict.
    func load(_ name: String, from tensor: Tensor) throws
    /// The key prefix of this adapter's tensors; nil means PEFT's usual `base_model.model.<path>.`
    /// (prompt learning saves bare `prompt_embeddings`).
    var keyPrefix: String? { get }
    /// Whether the adapter folds into the module's parameters (virtual tokens do not).
    var mergeable: Bool { get }
    /// Why the adapter cannot merge, for the error `merge` throws.
    var notMergeableReason: String { get }
    /// What PEFT's file holds for this adapter, when that differs from the trainable parameters (P-tuning saves
    /// its encoder's output, not the encoder).
    var exportedParameters: [(name: String, tensor: Tensor)] { get }
}

extension ModuleAdapterMethod {
    public var keyPrefix: String? { nil }
    public var mergeable: Bool { true }
    public var notMergeableReason: String { "it adds virtual tokens" }
    public var exportedParameters: [(name: String, tensor: Tensor)] { namedParameters }

    /// The PEFT key of parameter `name` for a module at `path`.
    func key(_ name: String, path: String) -> String { (keyPrefix ?? "base_model.model.\(path).") + name }

    /// Copies `tensor` into the parameter called `name` after checking its shape; `hint` names the config key
    /// that sets the shape.
    func loadNamedParameter(_ name: String, from tensor: Tensor, hint: String? = nil) throws {
        guard let target = namedParameters.first(where: { $0.name == name })?.tensor else {
            throw GraftError.format("unknown \(Self.self) tensor '\(name)' (expected \(namedParameters.map(\.name).joined(separator: ", ")))")
        }
        guard target.shape == tensor.shape else {
            throw GraftError.format("'\(name)' has shape \(tensor.shape), the layer expects \(target.shape)" + (hint.map { " (check \($0))" } ?? ""))
        }
        target.pointer.update(from: tensor.pointer, count: target.count)
    }
}

/// Builds module adapters for methods that target LayerNorms, embeddings, ...
public protocol ModuleAdapterFactory {
    /// The `peft_type` this factory handles.
    static var peftType: String { get }
    /// Family, for `graft methods`.
    static var family: String { get }
    /// A small config for `graft methods`.
    static func exampleConfig(targets: [String]) -> [String: Any]
    /// The adapter for `module` at `path`, or nil when the method does not apply to that kind of module.
    static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)?
    /// True for methods that act on the model's input rather than on named modules (prompt learning): they need
    /// no `target_modules` and attach once, to the first module that takes them.
    static var actsOnInput: Bool { get }
    /// True for methods that pick transformer layers themselves (bottleneck adapters, ReFT): they need no
    /// `target_modules`, and every module `make` accepts is adapted.
    static var selectsLayers: Bool { get }
    /// Whether the adapter folds into the model's parameters (for `graft methods`); default: not for input methods.
    static var mergeable: Bool { get }
    /// Whether outputs are checked against a fixture written by Hugging Face PEFT.
    static var hasPEFTParity: Bool { get }
}

extension ModuleAdapterFactory {
    public static var actsOnInput: Bool { false }
    public static var selectsLayers: Bool { false }
    public static var mergeable: Bool { !actsOnInput }
    public static var hasPEFTParity: Bool { true }
}

/// The index of the transformer layer at `path` (its last component, `encoder.layer.3` → 3).
func layerIndex(_ path: String) -> Int? {
    path.split(separator: ".").last.flatMap { Int($0) }
}

/// Shared by the prompt-learning factories: the model they attach to (a BERT encoder or a Llama decoder) and the
/// validated `num_virtual_tokens`.
func virtualTokenTarget(_ module: Module, config: AdapterConfig) throws -> (any PromptHost, Int)? {
    // PEFT records the model's sizes in prompt-learning configs; Graft reads them from the model itself.
    config.acknowledge("num_attention_heads", "num_layers", "token_dim", "num_transformer_submodules")
    guard let host = module as? any PromptHost else { return nil }
    let n = try config.int("num_virtual_tokens", default: 8)
    guard n > 0 else { throw GraftError.invalid("\(config.source): 'num_virtual_tokens' must be positive, got \(n)") }
    let dim = try config.int("token_dim", default: host.embeddingWidth)
    guard dim == host.embeddingWidth else {
        throw GraftError.invalid("\(config.source): token_dim \(dim) differs from the model's hidden size \(host.embeddingWidth)")
    }
    return (host, n)
}

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

/// Trainable tokens (PEFT): new values for selected rows of an embedding table, trained while the rest stays
/// frozen. PEFT key `trainable_tokens_delta` `[tokens, dim]` (the replacement rows, in `token_indices` order).
public final class TrainableTokensLayer: ModuleAdapterMethod, EmbeddingAdapter {
    public let state: AdapterState
    /// The replacement rows.
    public let rows: Tensor
    /// The token ids whose rows are replaced.
    public let tokenIndices: [Int32]
    let table: Embedding
    let slot: [Int32: Int32]

    init(table: Embedding, tokenIndices: [Int32], state: AdapterState) throws {
        if let bad = tokenIndices.first(where: { $0 < 0 || Int($0) >= table.count }) {
            throw GraftError.invalid("token index \(bad) is outside the embedding's 0..<\(table.count)")
        }
        self.state = state
        self.table = table
        self.tokenIndices = tokenIndices
        rows = embedding(tokenIndices, table: table.weight).detached().copy().requiringGrad()
        slot = Dictionary(tokenIndices.enumerated().map { ($0.element, Int32($0.offset)) }, uniquingKeysWith: { a, _ in a })
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var namedParameters: [(name: String, tensor: Tensor)] { [("trainable_tokens_delta", rows)] }
    public func attach() { table.adapters.append(self) }
    public func detach() { table.adapters.removeAll { $0 === self } }

    public func forward(ids: [Int32], baseOutput y: Tensor, layer: Embedding) -> Tensor {
        // Rows of selected tokens come from `rows` (index k), the others from the base (index → a zero row).
        let zeroSlot = Int32(tokenIndices.count)
        let picks = ids.map { slot[$0] ?? zeroSlot }
        let keep = Tensor(shape: [ids.count, 1], values: ids.map { slot[$0] == nil ? 1 : 0 })
        let replacement = embedding(picks, table: concat([rows, Tensor(zeros: [1, layer.dim])], dim: 0))
        return y * keep + replacement
    }

    public func merge() -> [Tensor] {
        let saved = [table.weight.copy()]
        for (k, id) in tokenIndices.enumerated() {
            (table.weight.pointer + Int(id) * table.dim).update(from: rows.pointer + k * table.dim, count: table.dim)
        }
        return saved
    }

    public func unmerge(_ saved: [Tensor]) {
        if let w = saved.first { table.weight.pointer.update(from: w.pointer, count: w.count) }
    }

    public func load(_ name: String, from tensor: Tensor) throws {
        guard name == "trainable_tokens_delta" else { throw GraftError.format("unknown trainable-tokens tensor '\(name)'") }
        guard rows.shape == tensor.shape else {
            throw GraftError.format("'trainable_tokens_delta' has shape \(tensor.shape), expected \(rows.shape) for token_indices \(tokenIndices)")
        }
        rows.pointer.update(from: tensor.pointer, count: rows.count)
    }
}

/// Trainable tokens (`peft_type: "TRAINABLE_TOKENS"`): `target_modules` (the embedding), `token_indices`.
public enum TrainableTokensFactory: ModuleAdapterFactory {
    public static let peftType = "TRAINABLE_TOKENS"
    public static let family = "selective (embedding rows)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["target_modules": ["word_embeddings", "embed_tokens"], "token_indices": [0, 1, 2]] }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        guard let table = module as? Embedding else { return nil }
        guard let indices = config.value("token_indices") as? [Int], !indices.isEmpty else {
            throw GraftError.invalid("\(config.source): 'token_indices' must be a non-empty list of token ids")
        }
        do {
            return try TrainableTokensLayer(table: table, tokenIndices: indices.map { Int32(clamping: $0) }, state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}

/// Learned embeddings PEFT saves as a bare `prompt_embeddings` key, attached to a BERT encoder (the shared part
/// of prompt, P- and prefix tuning: loading, lifetime, no merging).
public class VirtualTokenLayer: ModuleAdapterMethod {
    public let state: AdapterState
    /// The embeddings, `[virtualTokens, width]`.
    public let embeddings: Tensor
    let host: any PromptHost

    init(host: any PromptHost, rows: Int, width: Int, state: AdapterState) {
        self.state = state
        self.host = host
        embeddings = Tensor.randomNormal([rows, width], std: 0.02, rng: &state.rng).requiringGrad()
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var keyPrefix: String? { "" }
    public var mergeable: Bool { false }
    public var namedParameters: [(name: String, tensor: Tensor)] { [("prompt_embeddings", embeddings)] }
    public var exportedParameters: [(name: String, tensor: Tensor)] { namedParameters }
    public func attach() {}
    public func detach() {}
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    public func load(_ name: String, from tensor: Tensor) throws {
        guard name == "prompt_embeddings" else { throw GraftError.format("unknown \(Self.self) tensor '\(name)'") }
        guard tensor.shape == embeddings.shape else {
            throw GraftError.format("'prompt_embeddings' has shape \(tensor.shape), expected \(embeddings.shape) (check num_virtual_tokens)")
        }
        embeddings.pointer.update(from: tensor.pointer, count: embeddings.count)
    }
}

/// Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021) at inference: learned virtual-token
/// embeddings `[n, hidden]` prepended to every input. PEFT saves P-tuning's encoder output under the same key,
/// so both load as `prompt_embeddings`. (Training P-tuning's MLP/LSTM encoder is not implemented yet.)
public final class PromptTuningLayer: VirtualTokenLayer, PromptAdapter {
    init(host: any PromptHost, virtualTokens: Int, state: AdapterState) {
        super.init(host: host, rows: virtualTokens, width: host.embeddingWidth, state: state)
    }

    public func virtualTokens() -> Tensor { embeddings }
    public override func attach() { host.promptAdapters.append(self) }
    public override func detach() { host.promptAdapters.removeAll { $0 === self } }
}

/// Prompt tuning (`PROMPT_TUNING`) and P-tuning (`P_TUNING`, inference): `num_virtual_tokens`, `token_dim`,
/// `prompt_tuning_init` (`RANDOM`, or `TEXT` is not supported yet). Applies to BERT encoders.
public enum PromptTuningFactory: ModuleAdapterFactory {
    public static let peftType = "PROMPT_TUNING"
    public static let family = "input (virtual tokens)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["num_virtual_tokens": 8] }

    public static let actsOnInput = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        if let initMode = try config.string("prompt_tuning_init"), initMode != "RANDOM" {
            throw GraftError(.unsupported, "\(config.source): prompt_tuning_init '\(initMode)' is not supported yet (RANDOM)")
        }
        guard let (host, n) = try virtualTokenTarget(module, config: config) else { return nil }
        return PromptTuningLayer(host: host, virtualTokens: n, state: state)
    }
}

/// P-tuning (Liu et al., 2021) while training: the virtual tokens are `MLP(E)`, PEFT's `PromptEncoder` with
/// `encoder_reparameterization_type: "MLP"` — `Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)` over
/// trainable input embeddings `E` `[n, d]`. PEFT saves the encoder's output as `prompt_embeddings`, and so does
/// Graft; such a file (its config has `inference_mode: true`) loads as a ``PromptTuningLayer``.
public final class PTuningEncoderLayer: VirtualTokenLayer, PromptAdapter {
    /// The MLP's layers: weights `[out, in]` and biases, PEFT's `mlp_head.{0,2,4}`.
    public let weights: [Tensor], biases: [Tensor]

    init(host: any PromptHost, virtualTokens: Int, hidden: Int, state: AdapterState) {
        let d = host.embeddingWidth
        var ws: [Tensor] = [], bs: [Tensor] = []
        for (inF, outF) in [(d, hidden), (hidden, hidden), (hidden, d)] {
            // torch.nn.Linear's default init: U(-1/√in, 1/√in) for weight and bias.
            let bound = 1 / Float(inF).squareRoot()
            ws.append(Tensor.randomUniform([outF, inF], low: -bound, high: bound, rng: &state.rng).requiringGrad())
            bs.append(Tensor.randomUniform([outF], low: -bound, high: bound, rng: &state.rng).requiringGrad())
        }
        weights = ws
        biases = bs
        super.init(host: host, rows: virtualTokens, width: d, state: state)
    }

    public func virtualTokens() -> Tensor {
        var h = embeddings
        for i in 0..<3 {
            h = linear(h, weights[i], biases[i])
            if i < 2 { h = relu(h) }
        }
        return h
    }

    public override var namedParameters: [(name: String, tensor: Tensor)] {
        var out: [(String, Tensor)] = [("prompt_encoder.embedding.weight", embeddings)]
        for i in 0..<3 {
            out.append(("prompt_encoder.mlp_head.\(2 * i).weight", weights[i]))
            out.append(("prompt_encoder.mlp_head.\(2 * i).bias", biases[i]))
        }
        return out
    }

    public override var exportedParameters: [(name: String, tensor: Tensor)] {
        [("prompt_embeddings", withNoGrad { virtualTokens() })]
    }

    public override func load(_ name: String, from tensor: Tensor) throws {
        try loadNamedParameter(name, from: tensor, hint: "num_virtual_tokens, encoder_hidden_size")
    }

    public override func attach() { host.promptAdapters.append(self) }
    public override func detach() { host.promptAdapters.removeAll { $0 === self } }
}

/// P-tuning (`P_TUNING`): `num_virtual_tokens`, `encoder_hidden_size` (default: the model's hidden size),
/// `encoder_reparameterization_type` (`MLP`; `LSTM` is not supported). A fresh adapter trains the MLP
/// encoder; a PEFT file (`inference_mode: true`) holds the encoder's output and loads as plain virtual tokens.
public enum PTuningFactory: ModuleAdapterFactory {
    public static let peftType = "P_TUNING"
    public static let family = "input (virtual tokens from an encoder)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["num_virtual_tokens": 8, "encoder_hidden_size": 64] }

    public static let actsOnInput = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let kind = try config.string("encoder_reparameterization_type") ?? "MLP"
        // PEFT's MLP encoder always has two layers and ignores encoder_num_layers (an LSTM setting).
        config.acknowledge("encoder_num_layers")
        guard kind == "MLP" else {
            throw GraftError(.unsupported, "\(config.source): encoder_reparameterization_type '\(kind)' is not supported (MLP)")
        }
        guard let (host, n) = try virtualTokenTarget(module, config: config) else { return nil }
        if try config.bool("inference_mode", default: false) {
            // The file holds the encoder's output; the encoder's width no longer matters.
            config.acknowledge("encoder_hidden_size")
            return PromptTuningLayer(host: host, virtualTokens: n, state: state)
        }
        let hidden = try config.int("encoder_hidden_size", default: host.embeddingWidth)
        guard hidden > 0 else { throw GraftError.invalid("\(config.source): 'encoder_hidden_size' must be positive, got \(hidden)") }
        return PTuningEncoderLayer(host: host, virtualTokens: n, hidden: hidden, state: state)
    }
}

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
