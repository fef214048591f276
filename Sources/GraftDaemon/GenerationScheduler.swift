import Foundation
import Graft

/// How the engine batches generate requests and bounds their memory.
struct GenerationSettings: Sendable {
    /// The most positions (prompt + `max_new_tokens`) one request may use; nil = the model's context length.
    var contextLimit: Int?
    /// The most sequences one decode step runs; later requests wait for a slot.
    var maxBatchSequences = 32
    /// Bytes of finished sequences' KV caches kept for prompt caching, per model (0 = none).
    var prefixCacheBytes = 256 << 20
}

/// Counters of batched generation, read by `server_stats` on the loop thread (guarded by the engine's lock).
struct GenerationStatistics: Sendable {
    var requests: UInt64 = 0
    var steps: UInt64 = 0
    var tokens: UInt64 = 0
    var generating = 0
    var kvCacheBytes = 0
    var prefixCacheBytes = 0
    var prefixCacheHits: UInt64 = 0
    var prefixCacheTokens: UInt64 = 0
}

/// The generations in flight (worker thread only, except ``Engine/generationStatistics``).
final class GenerationState {
    /// A generate request in the batch: where its answers go and its sequence.
    struct Running {
        var context: RequestContext
        var generation: BatchedGeneration
        /// The model's ``cacheEpoch`` when the request was admitted (its cache may be kept only if unchanged).
        var epoch: UInt64
    }

    /// Sequences generating, by model id, in admission order.
    var running: [String: [Running]] = [:]
    /// Models with a step queued on the worker.
    var stepQueued: Set<String> = []
    /// Whether the model's last step was a prefill (so the next one decodes and neither starves).
    var lastStepPrefilled: [String: Bool] = [:]
    /// Kept caches for prompt caching, by model id.
    var prefixCaches: [String: PromptPrefixCache] = [:]
    /// Bumped whenever a model's adapters may have changed; caches from an older epoch are not kept.
    var cacheEpoch: [String: UInt64] = [:]
    /// Int8 copies of adapter factors that fast-mode steps read, by model id: kept while the model's batch runs,
    /// dropped when it empties or a request may change an adapter.
    var factorCopies: [String: Int8FactorCopies] = [:]
}

extension Engine {
    /// Forgets the kept prompt caches and int8 adapter copies of every model (after a request that may change
    /// adapters' weights).
    func invalidatePromptCaches() {
        generation.factorCopies.removeAll()
        for (id, cache) in generation.prefixCaches {
            cache.removeAll()
            generation.cacheEpoch[id, default: 0] += 1
        }
        publishGenerationStatistics()
    }

    /// The prompt cache of `modelID`, unless it is being trained (its weights change every step).
    func promptCache(_ modelID: String) -> PromptPrefixCache? {
        guard settings.prefixCacheBytes > 0, !jobs.all.contains(where: { $0.modelID == modelID && !$0.isFinished }) else { return nil }
        if let cache = generation.prefixCaches[modelID] { return cache }
        let cache = PromptPrefixCache(budgetBytes: settings.prefixCacheBytes)
        generation.prefixCaches[modelID] = cache
        return cache
    }

    /// The int8 copies fast-mode steps of `modelID` read, unless it is being trained (its weights change every
    /// step: its steps then read the float32 factors).
    func factorCopies(_ modelID: String) -> Int8FactorCopies? {
        guard !jobs.all.contains(where: { $0.modelID == modelID && !$0.isFinished }) else {
            generation.factorCopies[modelID] = nil
            return nil
        }
        if let copies = generation.factorCopies[modelID] { return copies }
        let copies = Int8FactorCopies()
        generation.factorCopies[modelID] = copies
        return copies
    }

    /// Adds a prepared generation to its model's batch and makes sure a step is queued.
    func admit(_ g: BatchedGeneration, modelID: String, context: RequestContext) {
        generation.running[modelID, default: []].append(
            .init(context: context, generation: g, epoch: generation.cacheEpoch[modelID, default: 0]))
        queueStep(modelID)
        publishGenerationStatistics()
    }

    /// Queues one decode step of `modelID`'s batch at the back of the worker's queue (so other requests run
    /// between steps); ends the batch with an error if the worker is stopping.
    func queueStep(_ modelID: String) {
        guard !generation.stepQueued.contains(modelID) else { return }
        generation.stepQueued.insert(modelID)
        let accepted = worker.submit(.init(startsJob: false) { [self] in runStep(modelID) })
        if !accepted {
            generation.stepQueued.remove(modelID)
            for r in generation.running.removeValue(forKey: modelID) ?? [] {
                end(r, .failed(GraftError(.state, "the daemon is shutting down")))
            }
        }
    }

    /// Runs one step of `modelID`'s batch: the prefill of a newly joined prompt or a decode step of the others
    /// (alternating when both wait), streams each row's token, answers the rows that finished, and queues the next
    /// step while any row remains.
    func runStep(_ modelID: String) {
        generation.stepQueued.remove(modelID)
        defer { publishGenerationStatistics() }
        var list = generation.running.removeValue(forKey: modelID) ?? []
        guard !list.isEmpty else { return }
        guard let s = models[modelID] else {
            for r in list { end(r, .failed(GraftError(.notFound, "generate: model '\(modelID)' was unloaded while generating"))) }
            return
        }
        let closed = closedConnections(list.map(\.context.connection))
        list = list.filter { r in
            if closed.contains(r.context.connection) { end(r, .abandoned); return false }
            if r.generation.isFinished { end(r, .finished(modelID)); return false }  // max_new_tokens 0
            if let problem = s.batchingProblem(for: r.generation) {
                end(r, .failed(GraftError(.state, "generate: \(problem) while generating")))
                return false
            }
            return true
        }
        let prefilling = list.indices.filter { list[$0].generation.sequence.isPrefilling }
        let decoding = list.indices.filter { !list[$0].generation.sequence.isPrefilling }
        let prefill = !prefilling.isEmpty && (decoding.isEmpty || generation.lastStepPrefilled[modelID] != true)
        var rows: [Int] = []
        // Fast decoding is a mode of the whole pass: a step runs the rows of its first row's mode.
        let candidates = prefill ? prefilling : decoding
        let fast = candidates.first.map { list[$0].generation.sequence.parameters.fastDecode } ?? false
        // A prompt is prefilled in a step of its own, as it is alone: a GEMM's value for a row can depend on how
        // many rows it multiplies (OpenBLAS picks kernels by size), so prompts batched together would differ from
        // their runs alone in the last digits, which greedy decoding (and the fast mode's int8 rounding) can turn
        // into other tokens. Decode steps, one row per sequence, run every sequence together.
        let limit = prefill ? 1 : settings.maxBatchSequences
        for i in candidates where list[i].generation.sequence.parameters.fastDecode == fast {
            if rows.count >= limit { break }
            rows.append(i)
        }
        generation.lastStepPrefilled[modelID] = prefill
        do {
            let copies = fast ? factorCopies(modelID) : nil
            let pieces = try withInt8FactorCopies(copies) { try s.step(rows.map { list[$0].generation }) }
            pendingLock.lock()
            generationCounts.steps += 1
            generationCounts.tokens += UInt64(rows.count)
            pendingLock.unlock()
            for (i, piece) in zip(rows, pieces) where piece.reported {
                reply(list[i].context, final: false) { $0.token = .with { $0.tokenID = piece.token; $0.text = piece.text } }
            }
        } catch {
            for i in rows { end(list[i], .failed(error)) }
            list = list.enumerated().filter { !rows.contains($0.offset) }.map(\.element)
            rows = []
        }
        var remaining: [GenerationState.Running] = []
        for r in list {
            if r.generation.isFinished { end(r, .finished(modelID)) } else { remaining.append(r) }
        }
        guard !remaining.isEmpty else {
            generation.factorCopies[modelID] = nil
            return
        }
        generation.running[modelID] = remaining + (generation.running[modelID] ?? [])
        queueStep(modelID)
    }

    /// How a row leaves the batch.
    enum RowEnd {
        /// It finished generating on `modelID`: answer with its tokens.
        case finished(String)
        /// It failed: answer with the error.
        case failed(Error)
        /// Its connection closed: answer nothing.
        case abandoned
    }

    /// Answers a row that left the batch, keeps a finished row's cache for prompt caching when still valid, and
    /// releases its connection's later requests.
    func end(_ r: GenerationState.Running, _ how: RowEnd) {
        switch how {
        case .finished(let modelID):
            let g = r.generation
            if generation.cacheEpoch[modelID, default: 0] == r.epoch, let cache = promptCache(modelID) { cache.store(g) }
            let text = models[modelID]?.model.decode(g.reported) ?? ""
            reply(r.context) { $0.generated = .with { $0.ids = g.reported; $0.text = text } }
        case .failed(let error):
            emit(.reply(r.context, Self.errorResponse(id: r.context.id, error), final: true))
        case .abandoned:
            break
        }
        generationEnded(r.context.connection)
    }

    /// Publishes the in-flight figures for `server_stats`.
    func publishGenerationStatistics() {
        let all = generation.running.values.joined()
        let kv = all.reduce(0) { $0 + $1.generation.sequence.cache.allocatedBytes }
        let caches = generation.prefixCaches.values
        pendingLock.lock()
        generationCounts.generating = all.count
        generationCounts.kvCacheBytes = kv
        generationCounts.prefixCacheBytes = caches.reduce(0) { $0 + $1.bytes }
        generationCounts.prefixCacheHits = caches.reduce(0) { $0 + $1.hits }
        generationCounts.prefixCacheTokens = caches.reduce(0) { $0 + $1.reusedTokens }
        pendingLock.unlock()
    }
}
