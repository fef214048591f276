import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Activated LoRA (aLoRA; Greenewald et al., 2025; PEFT's `alora_invocation_tokens` on a `LORA` config): the update
/// `s·B A x` applies only from the start of the **last** occurrence of the invocation token sequence in each
/// sequence on; the tokens before it see the base model, so their KV cache is the base model's.
///
/// As PEFT computes it (`calculate_alora_offsets` and `ALoraLinearVariant.forward`):
/// - a sequence without the invocation sequence is the base model throughout;
/// - in training each packed sequence is searched on its own;
/// - in generation the prompt decides: when it holds the invocation sequence the adapter acts from there and on
///   every generated token, otherwise on none (occurrences among generated tokens do not count, as in PEFT,
///   which computes the offsets once per `generate`). The decision is kept with the sequence's KV cache.
///
/// The activation is a ``TokenObserver`` on the decoder (``GraftModels/TokenObserverHost``): before each pass it
/// turns the batch's tokens into a 0/1 gate per token that the adapter's ``LoRALayer``s multiply their update by.
/// It only targets the decoder layers' Linear modules (whose rows are the tokens), never `lm_head`; it has no
/// weight form, so merging is refused (PEFT raises too), and mixed-adapter batches refuse it (their segments
/// are rows of another batch). PEFT warns that aLoRA is for `CAUSAL_LM` and computes no offsets for other models
/// (leaving the base model); Graft refuses it on a model without a token-observing decoder instead.
public final class ALoRAActivation: ModuleAdapterMethod, TokenObserver {
    public let state: AdapterState
    /// The invocation token sequence.
    public let invocation: [Int32]
    /// The model whose passes are observed.
    weak var host: (any TokenObserverHost)?
    /// The current pass's gate, one value per token row (`[rows]`, 0 or 1); nil when no token is active.
    private(set) var gate: Tensor?
    /// Rows of the current pass (so a layer seeing another row count applies nothing rather than a wrong gate).
    private(set) var rows = 0

    init(invocation: [Int32], host: any TokenObserverHost, state: AdapterState) {
        self.invocation = invocation
        self.host = host
        self.state = state
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var namedParameters: [(name: String, tensor: Tensor)] { [] }
    public func attach() { host?.tokenObservers.append(self) }
    public func detach() { host?.tokenObservers.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}
    public func load(_ name: String, from tensor: Tensor) throws {
        throw GraftError.format("unexpected tensor '\(name)' for aLoRA's activation (it has none)")
    }
    public var mergeable: Bool { false }
    public var notMergeableReason: String {
        "aLoRA (alora_invocation_tokens) applies its update only from the invocation sequence on, so it has no weight form (PEFT cannot merge it either)"
    }

    /// The start of the last complete occurrence of the invocation sequence in `tokens`, or nil.
    func lastInvocationStart(_ tokens: ArraySlice<Int32>) -> Int? {
        let n = invocation.count
        guard n > 0, tokens.count >= n else { return nil }
        var start = tokens.endIndex - n
        while start >= tokens.startIndex {
            if tokens[start..<(start + n)].elementsEqual(invocation) { return start }
            start -= 1
        }
        return nil
    }

    public func willRun(_ batch: TokenBatch, caches: [KVCache?]) {
        let key = ObjectIdentifier(self)
        let t = batch.length
        var values = [Float](repeating: 0, count: batch.batchSize * t)
        for r in 0..<batch.batchSize {
            let real = batch.lengths[r]
            let cache = r < caches.count ? caches[r] : nil
            if let cache, cache.length > 0 {
                // A continuation: active on every token iff the prompt held the invocation sequence.
                if cache.adapterMarks[key] == 1 { for i in 0..<real { values[r * t + i] = 1 } }
                continue
            }
            // Each packed sequence (a run of one segment id) is searched on its own.
            var runStart = 0
            var found = false
            while runStart < real {
                var runEnd = runStart + 1
                if let segments = batch.segments {
                    while runEnd < real, segments[r * t + runEnd] == segments[r * t + runStart] { runEnd += 1 }
                } else {
                    runEnd = real
                }
                if let p = lastInvocationStart(batch.ids[(r * t + runStart)..<(r * t + runEnd)]) {
                    found = true
                    for i in (p - r * t)..<runEnd { values[r * t + i] = 1 }
                }
                runStart = runEnd
            }
            cache?.adapterMarks[key] = found ? 1 : 0
        }
        rows = values.count
        gate = values.contains(1) ? Tensor(shape: [values.count], values: values) : nil
    }

    /// Whether no token of the current pass is active (the layers then skip their update).
    var isIdle: Bool { gate == nil }

    /// `update` (`[…, out]`, one row per token of the current pass) with the rows before the activation point
    /// zeroed, recorded for autograd; nil when no token of the pass is active or the rows are not the pass's tokens.
    func gated(_ update: Tensor) -> Tensor? {
        guard let gate, let width = update.shape.last, width > 0, update.count / width == rows else { return nil }
        return update * gate.reshaped(Array(update.shape.dropLast()) + [1])
    }
}

extension AdaptedModel {
    /// aLoRA's activation for `config` (nil without `alora_invocation_tokens`), checked against the model and the
    /// layers the adapter targets.
    func aloraActivation(config: AdapterConfig, state: AdapterState, layers: [(path: String, linear: Linear, adapter: any LinearAdapterMethod)]) throws -> ALoRAActivation? {
        guard let invocation = try ALoRAActivation.invocationTokens(config) else { return nil }
        guard let host = root as? any TokenObserverHost else {
            throw GraftError(.unsupported, "\(config.source): 'alora_invocation_tokens' (aLoRA) needs a causal decoder (Llama); this \(root.typeName) has none (PEFT applies aLoRA under CAUSAL_LM only)")
        }
        if let (path, _, _) = layers.first(where: { !$0.path.hasPrefix(host.tokenAlignedPrefix) }) {
            throw GraftError(.unsupported, "\(config.source): aLoRA (alora_invocation_tokens) adapts the decoder layers' Linear modules, whose rows are the tokens; '\(path)' is outside '\(host.tokenAlignedPrefix)*'")
        }
        let activation = ALoRAActivation(invocation: invocation, host: host, state: state)
        for case let (_, _, lora as LoRALayer) in layers { lora.activation = activation }
        return activation
    }
}

extension ALoRAActivation {
    /// `alora_invocation_tokens` of `config`: nil when absent or null, else a non-empty list of token ids.
    static func invocationTokens(_ config: AdapterConfig) throws -> [Int32]? {
        guard let value = config.value("alora_invocation_tokens"), !(value is NSNull) else { return nil }
        guard let list = value as? [Any], !list.isEmpty else {
            throw GraftError.invalid("\(config.source): 'alora_invocation_tokens' must be a non-empty list of token ids, got \(JSONScalar.describe(value))")
        }
        return try list.enumerated().map { i, v in
            guard let n = JSONScalar.integer(v), n >= 0, n <= Int(Int32.max) else {
                throw GraftError.invalid("\(config.source): 'alora_invocation_tokens'[\(i)] = \(JSONScalar.describe(v)) is not a token id")
            }
            return Int32(n)
        }
    }

    /// PEFT's rules: aLoRA is its own LoRA variant, so it does not combine with DoRA or KaSA; Graft also keeps it
    /// to the plain initialisations (true, false, "gaussian") and to trainable A.
    static func validate(_ config: AdapterConfig) throws {
        guard try invocationTokens(config) != nil else { return }
        for key in ["use_dora", "kasa_config"] where !(config.value(key) is NSNull) && config.value(key) != nil
            && JSONScalar.bool(config.value(key)) != false {
            throw GraftError(.unsupported, "\(config.source): 'alora_invocation_tokens' (aLoRA) cannot be combined with '\(key)' (PEFT has no such variant)")
        }
        if let initial = config.value("init_lora_weights"), !(initial is NSNull), JSONScalar.bool(initial) == nil,
           (initial as? String) != "gaussian" {
            throw GraftError(.unsupported, "\(config.source): 'alora_invocation_tokens' (aLoRA) with init_lora_weights \(JSONScalar.describe(initial)) is not supported yet (use true, false or \"gaussian\")")
        }
        if config.value("train_a") != nil, !(try config.bool("train_a", default: true)) {
            throw GraftError(.unsupported, "\(config.source): 'alora_invocation_tokens' (aLoRA) with train_a false is not supported")
        }
    }
}
