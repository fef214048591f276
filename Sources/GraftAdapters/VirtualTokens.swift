import GraftModels
import GraftTensor

/// Learned embeddings PEFT saves as a bare `prompt_embeddings` key, attached to a BERT encoder (the shared part
/// of prompt, P- and prefix tuning: loading, lifetime, no merging).
public class VirtualTokenLayer: ModuleAdapterMethod {
    public let state: AdapterState
    /// The embeddings, `[virtualTokens, width]`.
    public let embeddings: Tensor
    let host: any PromptHost

    init(host: any PromptHost, rows: Int, width: Int, state: AdapterState, std: Float = 0.02) {
        self.state = state
        self.host = host
        embeddings = Tensor.randomNormal([rows, width], std: std, rng: &state.rng).requiringGrad()
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
