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
    public func loadNamedParameter(_ name: String, from tensor: Tensor, hint: String? = nil) throws {
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
public protocol ModuleAdapterFactory: Sendable {
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
    /// True for methods PEFT defines for causal decoders only (LLaMA-Adapter, CPT): they apply to Llama models,
    /// and encoder-only surfaces (the MiniLM fine-tune test) leave them out.
    static var requiresDecoder: Bool { get }
    /// Called once the adapter's modules are attached to `root`, for model-level parts (a token observer);
    /// nothing by default. A throw detaches the adapter again.
    static func didAttach(_ adapter: NamedAdapter, root: Module) throws
    /// Called before the adapter is removed from `root`; undoes ``didAttach(_:root:)``. Nothing by default.
    static func willDetach(_ adapter: NamedAdapter, root: Module)
}

extension ModuleAdapterFactory {
    public static var actsOnInput: Bool { false }
    public static var selectsLayers: Bool { false }
    public static var mergeable: Bool { !actsOnInput }
    public static var requiresDecoder: Bool { false }
    public static func didAttach(_ adapter: NamedAdapter, root: Module) throws {}
    public static func willDetach(_ adapter: NamedAdapter, root: Module) {}
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
