import GraftAdapters
import GraftModels
import GraftRouting
import GraftTensor

/// A generation request running in a continuously batched decode loop (graftd): its sequence, the adapter it
/// runs under and its text stream. Made by ``GraftSession/prepareBatchedGeneration(prompt:parameters:stopAtEOS:adapter:contextLimit:prefixCache:)``,
/// advanced by ``GraftSession/step(_:)`` together with any others of the same model.
public final class BatchedGeneration {
    /// The sequence: cache, sampler, tokens so far.
    public let sequence: GenerationSequence
    /// The adapter the rows run under; nil = the base model.
    public let adapter: String?
    /// The prompt.
    public let prompt: [Int32]
    /// Leading prompt tokens whose keys and values came from the prefix cache instead of a forward pass.
    public let reusedPrefix: Int
    /// The new tokens reported so far (a stop token is not reported when the request stops at EOS).
    public internal(set) var reported: [Int32] = []
    let hiddenStops: Set<Int32>
    var text: TextStream

    init(sequence: GenerationSequence, adapter: String?, prompt: [Int32], reusedPrefix: Int, hiddenStops: Set<Int32>,
         text: TextStream) {
        self.sequence = sequence
        self.adapter = adapter
        self.prompt = prompt
        self.reusedPrefix = reusedPrefix
        self.hiddenStops = hiddenStops
        self.text = text
    }

    /// Whether the sequence has ended (stop token, token budget, or ``GenerationSequence/finish()``).
    public var isFinished: Bool { sequence.isFinished }
}

/// What one step produced for one ``BatchedGeneration``.
public struct GeneratedPiece: Sendable {
    /// The sampled token.
    public var token: Int32
    /// The text it completes ("" while a character is incomplete).
    public var text: String
    /// False for a stop token the request does not report.
    public var reported: Bool
}

extension GraftSession {
    /// Prepares `prompt` to join batched generation, or returns nil when it must run alone (``generate(prompt:parameters:stopAtEOS:onToken:)``):
    /// the model's own adapter setup cannot be routed per row (a merged or non-Linear adapter, X-LoRA, prompt or
    /// prefix tuning) and no `adapter` was named.
    ///
    /// `adapter`: a loaded adapter's name, "" for the base model, nil for the active adapter (the base when none
    /// is active or adapters are disabled). `contextLimit`: the most positions a sequence may hold (prompt +
    /// `maxNewTokens`; at most the model's context length); its KV cache is allocated for exactly what the request
    /// can use. `prefixCache`: where a shared prompt prefix under the same adapter may be found.
    public func prepareBatchedGeneration(prompt: [Int32], parameters: GenerationParameters, stopAtEOS: Bool,
                                         adapter: String?, contextLimit: Int?,
                                         prefixCache: PromptPrefixCache?) throws -> BatchedGeneration? {
        let llama = try taskModel.decoder()
        try parameters.validate()
        guard !prompt.isEmpty else { throw GraftError.invalid("generate: the prompt is empty") }
        if let bad = prompt.firstIndex(where: { $0 < 0 || Int($0) >= llama.config.vocabSize }) {
            throw GraftError.invalid("prompt[\(bad)] = \(prompt[bad]) is outside the vocabulary 0..<\(llama.config.vocabSize)")
        }
        let limit = min(contextLimit ?? llama.config.contextLength, llama.config.contextLength)
        let needed = prompt.count + parameters.maxNewTokens
        guard needed <= limit else {
            throw GraftError.invalid("generate: the prompt (\(prompt.count) tokens) + max_new_tokens (\(parameters.maxNewTokens)) = \(needed) positions exceed the context limit of \(limit)\(limit < llama.config.contextLength ? " (the model's context length is \(llama.config.contextLength))" : "")")
        }
        let name: String?
        switch adapter {
        case .some(""): name = nil
        case .some(let n):
            guard adapted.adapters.contains(where: { $0.name == n }) else {
                throw GraftError(.notFound, "generate: no adapter '\(n)' (loaded: \(adapted.adapters.map(\.name).joined(separator: ", ")))")
            }
            name = n
        case .none: name = adapted.adaptersDisabled ? nil : adapted.activeAdapter
        }
        if let problem = batchingProblem(llama, adapter: name) {
            if adapter == nil { return nil }
            throw GraftError(.unsupported, "generate: \(problem)")
        }
        var params = parameters
        if stopAtEOS { params.stopTokens.formUnion(ChatTemplate.stopTokens(model.tokenizer)) }
        let width = llama.config.kvHeads * llama.config.headDim
        let cache = KVCache(layerCount: llama.layers.count, width: width, capacity: needed)
        var reused = 0
        // The fast mode skips prompt caching: int8 rounding turns the last digits in which a cached prefix's keys
        // and values differ from a whole prompt's into other tokens.
        if let prefixCache, !params.fastDecode, let hit = prefixCache.lookup(adapter: name ?? "", prompt: prompt) {
            try cache.copyPrefix(of: hit.cache, positions: hit.length)
            reused = hit.length
        }
        let sequence = try GenerationSequence(pending: Array(prompt[reused...]), cache: cache, parameters: params)
        return BatchedGeneration(sequence: sequence, adapter: name, prompt: prompt, reusedPrefix: reused,
                                 hiddenStops: stopAtEOS ? params.stopTokens : [], text: TextStream(tokenizer: model.tokenizer))
    }

    /// Why rows under `adapter` cannot be routed per row now (it was deleted, merged, is not a Linear-layer method,
    /// or the model carries a pass that spans the batch), or nil when they can.
    public func batchingProblem(for generation: BatchedGeneration) -> String? {
        guard let llama = try? taskModel.decoder() else { return "the model is not a decoder" }
        return batchingProblem(llama, adapter: generation.adapter)
    }

    private func batchingProblem(_ llama: LlamaModel, adapter: String?) -> String? {
        var ids: [Int32] = []
        if let adapter {
            guard let index = adapted.adapters.firstIndex(where: { $0.name == adapter }) else {
                return "adapter '\(adapter)' was deleted"
            }
            ids = [Int32(index)]
        }
        do {
            try MixedAdapterBatch.checkMixable(adapted, ids: ids)
        } catch let e as GraftError {
            return e.message
        } catch {
            return "\(error)"
        }
        if llama.forwardHooks.contains(where: \.isEnabled) {
            return "the model runs a pass over the whole batch first (X-LoRA), which batched generation does not route"
        }
        if llama.promptAdapters.contains(where: \.isEnabled) || llama.prefixAdapters.contains(where: \.isEnabled) {
            return "prompt or prefix tuning is enabled on the model; batched generation does not route virtual tokens"
        }
        return nil
    }

    /// Runs one decode step of the unfinished `generations` as one batch, each row under its own adapter (rows
    /// grouped by adapter, base projections shared), and returns each one's token and text, in order. Throws when
    /// one cannot be routed (see ``batchingProblem(for:)``, which callers check first to drop only that one).
    public func step(_ generations: [BatchedGeneration]) throws -> [GeneratedPiece] {
        guard !generations.isEmpty else { return [] }
        let llama = try taskModel.decoder()
        let ids = try generations.map { g -> Int32 in
            guard let name = g.adapter else { return -1 }
            guard let index = adapted.adapters.firstIndex(where: { $0.name == name }) else {
                throw GraftError(.notFound, "generate: adapter '\(name)' was deleted while generating")
            }
            return Int32(index)
        }
        let order = ids.indices.sorted { (ids[$0], $0) < (ids[$1], $1) }
        let sortedIds = order.map { ids[$0] }
        let tokens = try llama.decodeStep(order.map { generations[$0].sequence }) { step in
            try MixedAdapterBatch.withRouting(adapted, ids: sortedIds, step)
        }
        var pieces = [GeneratedPiece](repeating: GeneratedPiece(token: 0, text: "", reported: false), count: generations.count)
        for (k, i) in order.enumerated() {
            let g = generations[i], token = tokens[k]
            if g.hiddenStops.contains(token) {
                pieces[i] = GeneratedPiece(token: token, text: "", reported: false)
            } else {
                g.reported.append(token)
                pieces[i] = GeneratedPiece(token: token, text: g.text.piece(after: token), reported: true)
            }
        }
        return pieces
    }
}
