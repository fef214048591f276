import Foundation
import GraftAdapters
import GraftModels
import GraftRouting
import GraftTensor

/// What ``GraftSession/forward(batch:adapterIds:output:)`` returns.
public enum SessionOutput: Int32, Sendable {
    /// Final hidden states `[batch, stride, hidden]`.
    case hidden = 1
    /// Logits: `[batch, stride, vocab]` (Llama) or `[batch, numLabels]` (sequence classification).
    case logits = 2
}

extension GraftSession {
    /// A `[batch, stride]` token batch from raw rows, validated once (lengths in 1...stride, every real id in the
    /// vocabulary); the padding is set to id 0 so nothing downstream reads what the caller left there.
    public func tokenBatch(ids: [Int32], lengths: [Int]?, batch: Int, stride: Int) throws -> TokenBatch {
        guard batch >= 1 else { throw GraftError.invalid("batch must be ≥ 1, got \(batch)") }
        guard stride >= 1 else { throw GraftError.invalid("stride must be ≥ 1, got \(stride)") }
        if let lengths, let bad = lengths.firstIndex(where: { $0 < 1 || $0 > stride }) {
            throw GraftError.invalid("lengths[\(bad)] = \(lengths[bad]) is outside 1...\(stride) (stride)")
        }
        let vocab = taskModel.vocabularySize
        let lens = lengths ?? [Int](repeating: stride, count: batch)
        var clean = ids
        for b in 0..<batch {
            for t in 0..<stride {
                let i = b * stride + t
                if t >= lens[b] { clean[i] = 0; continue }
                if ids[i] < 0 || Int(ids[i]) >= vocab {
                    throw GraftError.invalid("ids[\(i)] (row \(b), position \(t)) = \(ids[i]) is outside the vocabulary 0..<\(vocab)")
                }
            }
        }
        return try TokenBatch(ids: clean, batchSize: batch, length: stride, lengths: lens)
    }

    /// The number of floats ``forward(batch:adapterIds:output:)`` returns, or a throw when the output kind does
    /// not exist for this model.
    public func outputCount(batch: Int, stride: Int, output: SessionOutput) throws -> Int {
        let width = switch output {
        case .hidden: stride.multipliedReportingOverflow(by: taskModel.hiddenSize).partialValue
        case .logits: try taskModel.logitsPerRow(stride: stride)
        }
        let (n, overflow) = batch.multipliedReportingOverflow(by: width)
        guard !overflow else { throw GraftError.invalid("output of \(batch) rows × \(width) floats is too large") }
        return n
    }

    /// The output kind a request that names none gets: logits where the model has a head, else hidden states.
    public var defaultOutput: SessionOutput {
        (try? taskModel.logitsPerRow(stride: 1)) != nil ? .logits : .hidden
    }

    /// Runs the batch without recording and returns the output flattened as documented for
    /// `graft_model_forward`.
    ///
    /// `adapterIds` (one per batch row, -1 = base; nil = the current adapter state for every row) makes a
    /// mixed-adapter batch: rows are grouped by adapter, the model runs once with each adapted layer's base GEMM
    /// over the whole batch and each adapter's work on its own rows (see ``MixedAdapterBatch``), and the output
    /// comes back in the caller's row order. Methods that cannot mix (virtual tokens, LN tuning, trainable
    /// tokens) and merged adapters throw.
    public func forward(batch tokens: TokenBatch, adapterIds: [Int32]?, output: SessionOutput) throws -> [Float] {
        let count = try outputCount(batch: tokens.batchSize, stride: tokens.length, output: output)
        guard let adapterIds else { return try forwardRows(tokens, output: output) }
        guard adapterIds.count == tokens.batchSize else {
            throw GraftError.invalid("\(adapterIds.count) adapter ids for \(tokens.batchSize) rows")
        }
        let plan = try AdapterBatchPlan(adapterIds: adapterIds, adapterCount: adapted.adapters.count)
        let grouped = try plan.gather(tokens)
        let values = try MixedAdapterBatch.withRouting(adapted, ids: plan.sortedIds) { try forwardRows(grouped, output: output) }
        return plan.scatter(values, perRow: count / max(tokens.batchSize, 1))
    }

    private func forwardRows(_ batch: TokenBatch, output: SessionOutput) throws -> [Float] {
        try withNoGrad {
            let t = switch output {
            case .hidden: try taskModel.hiddenStates(batch)
            case .logits: try taskModel.logits(batch)
            }
            var values = t.scalars
            // Per-position outputs ([batch, length, width]): zero the padding positions so the output does not
            // depend on what the caller put there. A classifier's [batch, labels] has none.
            guard t.shape.count == 3 else { return values }
            let width = t.shape[2]
            for b in 0..<batch.batchSize where batch.lengths[b] < batch.length {
                let start = (b * batch.length + batch.lengths[b]) * width, end = (b + 1) * batch.length * width
                values.replaceSubrange(start..<end, with: repeatElement(0, count: end - start))
            }
            return values
        }
    }

    /// The decoder, and `parameters` with the model's end-of-sequence / end-of-turn tokens as stop tokens when
    /// `stopAtEOS`; throws for an encoder.
    private func generationSetup(_ parameters: GenerationParameters, stopAtEOS: Bool) throws -> (LlamaModel, GenerationParameters) {
        let llama = try taskModel.decoder()
        var params = parameters
        if stopAtEOS { params.stopTokens.formUnion(ChatTemplate.stopTokens(model.tokenizer)) }
        return (llama, params)
    }

    /// Generates after each of `prompts` with its own adapter (`adapterIds[i]`, -1 = base) as one batch (Llama
    /// only); see ``MixedAdapterBatch/generate(_:llama:prompts:adapterIds:parameters:onToken:)``. Stop tokens
    /// end a sequence and are not returned when `stopAtEOS`. `onToken(sequence, token)` returning false stops
    /// that sequence. Returns the new tokens per prompt, in the caller's order.
    public func generate(prompts: [[Int32]], adapterIds: [Int32], parameters: GenerationParameters, stopAtEOS: Bool,
                         onToken: (Int, Int32) -> Bool = { _, _ in true }) throws -> [[Int32]] {
        let (llama, params) = try generationSetup(parameters, stopAtEOS: stopAtEOS)
        for (i, prompt) in prompts.enumerated() {
            if let bad = prompt.firstIndex(where: { $0 < 0 || Int($0) >= llama.config.vocabSize }) {
                throw GraftError.invalid("prompts[\(i)][\(bad)] = \(prompt[bad]) is outside the vocabulary 0..<\(llama.config.vocabSize)")
            }
        }
        let out = try MixedAdapterBatch.generate(adapted, llama: llama, prompts: prompts, adapterIds: adapterIds, parameters: params) { i, id in
            params.stopTokens.contains(id) || onToken(i, id)
        }
        return out.map { $0.filter { !params.stopTokens.contains($0) } }
    }

    /// Generates after `prompt` (Llama only). `onToken` sees each token and the text it completes (only whole
    /// characters: a token ending inside a UTF-8 sequence reports "" and the next one the rest); returning false
    /// stops. Stop tokens (EOS, end of turn) end generation and are not reported when `stopAtEOS`.
    public func generate(prompt: [Int32], parameters: GenerationParameters, stopAtEOS: Bool,
                         onToken: (Int32, String) -> Bool) throws -> [Int32] {
        let (llama, params) = try generationSetup(parameters, stopAtEOS: stopAtEOS)
        if let bad = prompt.firstIndex(where: { $0 < 0 || Int($0) >= llama.config.vocabSize }) {
            throw GraftError.invalid("prompt[\(bad)] = \(prompt[bad]) is outside the vocabulary 0..<\(llama.config.vocabSize)")
        }
        var text = TextStream(tokenizer: model.tokenizer)
        let ids = try llama.generate(prompt: prompt, parameters: params) { id in
            if params.stopTokens.contains(id) { return false }
            return onToken(id, text.piece(after: id))
        }
        return ids.filter { !params.stopTokens.contains($0) }
    }

    /// `user` as the single user turn of the model's chat template, ready for the assistant's reply; throws
    /// when the model has none (an encoder, or a decoder whose vocabulary has no chat markers).
    public func chatPrompt(_ user: String) throws -> String {
        guard (try? taskModel.decoder()) != nil else {
            throw GraftError(.unsupported, "\(model.path): a chat template needs a decoder model (Llama); this is a \(model.architecture.rawValue) encoder")
        }
        return try ChatTemplate(tokenizer: model.tokenizer, source: model.path).prompt(user: user)
    }
}
