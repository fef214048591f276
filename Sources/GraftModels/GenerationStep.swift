import GraftTensor

/// One sequence being generated step by step, alone or in a batch with others (continuous batching: sequences
/// join and leave between steps): its KV cache, its sampler, the tokens it has yet to run and those it produced.
public final class GenerationSequence {
    /// Keys and values of the positions already run.
    public let cache: KVCache
    /// How this sequence samples and when it stops.
    public let parameters: GenerationParameters
    /// Tokens not yet run: the (rest of the) prompt before the first step, then the last sampled token.
    public private(set) var pending: [Int32]
    /// The tokens sampled so far (including a final stop token, if one was sampled).
    public private(set) var generated: [Int32] = []
    /// Set once a stop token was sampled, `maxNewTokens` were reached, or ``finish()`` was called.
    public private(set) var isFinished: Bool
    var sampler: TokenSampler

    /// A sequence that continues `cache` (empty, or holding a shared prompt prefix) with `pending`, the prompt
    /// tokens the cache does not hold yet (at least one).
    public init(pending: [Int32], cache: KVCache, parameters: GenerationParameters) throws {
        try parameters.validate()
        guard !pending.isEmpty else { throw GraftError.invalid("generate: the prompt is empty") }
        self.pending = pending
        self.cache = cache
        self.parameters = parameters
        self.sampler = TokenSampler(parameters: parameters)
        isFinished = parameters.maxNewTokens == 0
    }

    /// Whether the next step runs more than one token of this sequence (prompt prefill).
    public var isPrefilling: Bool { pending.count > 1 }

    /// Ends the sequence (its client went away, or a caller's callback asked to stop).
    public func finish() { isFinished = true }

    /// Records the token sampled for this sequence and decides whether it goes on.
    func accept(_ token: Int32) {
        generated.append(token)
        pending = [token]
        if parameters.stopTokens.contains(token) || generated.count >= parameters.maxNewTokens { isFinished = true }
    }
}

extension LlamaModel {
    /// Runs one step of the unfinished `sequences` as one batch (each row its own pending tokens, right-padded,
    /// attending to its own cache), samples each sequence's next token and records it. Returns the tokens, one per
    /// sequence, in order. The step runs in fast mode (``GenerationParameters/fastDecode``) only when every sequence
    /// asks for it; callers batch sequences of one mode together.
    ///
    /// `around(step)` wraps the forward pass: `step()` returns the next-token logits `[sequences.count, vocab]`
    /// (mixed-adapter routing installs itself here). Inference only.
    public func decodeStep(_ sequences: [GenerationSequence],
                           around: (_ step: () throws -> Tensor) throws -> Tensor = { try $0() }) throws -> [Int32] {
        guard !sequences.isEmpty else { return [] }
        if let done = sequences.firstIndex(where: \.isFinished) {
            throw GraftError(.state, "generate: sequence \(done) of the step has already finished")
        }
        let batch = try TokenBatch(sequences: sequences.map(\.pending))
        let h = config.hiddenSize, vocab = config.vocabSize
        // Fast mode (int8 activations against block-format weights) is a setting of the whole pass.
        let fast = sequences.allSatisfy(\.parameters.fastDecode)
        let logits = try withNoGrad { try withInt8Activations(fast) {
            try around {
                let hidden = try hiddenStates(batch, rowCaches: sequences.map(\.cache))
                let last = Tensor(zeros: [sequences.count, h])
                for (i, s) in sequences.enumerated() {
                    (last.pointer + i * h).update(from: hidden.pointer + (i * batch.length + s.pending.count - 1) * h, count: h)
                }
                return lmHead.forward(last)
            }
        } }
        guard logits.count == sequences.count * vocab else {
            throw GraftError(.internalError, "generate: step returned \(logits.shape) logits for \(sequences.count) rows")
        }
        var tokens: [Int32] = []
        tokens.reserveCapacity(sequences.count)
        for (i, s) in sequences.enumerated() {
            let next = s.sampler.sample(UnsafeBufferPointer(start: logits.pointer + i * vocab, count: vocab))
            s.accept(next)
            tokens.append(next)
        }
        return tokens
    }
}
