import GraftTensor

/// Something that runs before a model's forward pass over a batch, with the chance to run passes of its own first:
/// X-LoRA's scaling pass (a forward pass whose last hidden states choose the scalings of the real pass).
public protocol ForwardPassHook: AnyObject {
    /// Whether the hook runs on the next forward pass.
    var isEnabled: Bool { get }
    /// Called at the start of a forward pass over `batch`. `cache` is the decoder's KV cache when the pass
    /// continues cached sequences (generation), nil otherwise. A hook that runs the model itself must not recurse
    /// into its own call.
    func willRunForward(_ batch: TokenBatch, cache: KVCache?) throws
}

/// A model whose forward passes call ``ForwardPassHook``s first (BERT, Llama).
public protocol ForwardHookHost: AnyObject {
    /// The hooks, run in order before every forward pass.
    var forwardHooks: [any ForwardPassHook] { get set }
    /// The last hidden states `[batch, length, hidden]` as transformers' `hidden_states[-1]` (Llama: after the
    /// final norm), through the same hooks and adapters as any forward pass.
    func lastHiddenStates(_ batch: TokenBatch, cache: KVCache?) throws -> Tensor
}

extension ForwardHookHost {
    /// Runs every enabled hook before a pass over `batch`.
    func runForwardHooks(_ batch: TokenBatch, cache: KVCache?) throws {
        for hook in forwardHooks where hook.isEnabled { try hook.willRunForward(batch, cache: cache) }
    }
}
