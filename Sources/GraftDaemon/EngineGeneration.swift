import Foundation
import Graft

/// Generation: requests join their model's running batch (``GenerationState``) and stream tokens as they are
/// sampled, then the whole result. A connection's requests after a generate wait until it has finished, so each
/// connection still sees its requests answered in order; consecutive generate requests of one connection join the
/// batch together.
extension Engine {
    /// Queues a generate request for the worker; its connection counts it as running until it is answered.
    func submitGenerate(_ r: Graft_V1_Generate, context: RequestContext) -> Bool {
        pendingLock.lock()
        openGenerations[context.connection, default: 0] += 1
        pendingLock.unlock()
        let accepted = worker.submit(.init(startsJob: false) { [self] in
            var admitted = false
            do {
                admitted = try generate(r, context)
            } catch {
                emit(.reply(context, Self.errorResponse(id: context.id, error), final: true))
            }
            if !admitted { generationEnded(context.connection) }
        })
        if !accepted { generationEnded(context.connection) }
        return accepted
    }

    /// Holds `request` when its connection has a generation running or requests already held (answered in order
    /// once they end); false when it may be submitted now.
    func holdIfGenerating(_ request: Graft_V1_Request, context: RequestContext) -> Bool {
        pendingLock.lock()
        defer { pendingLock.unlock() }
        let c = context.connection
        guard openGenerations[c, default: 0] > 0 || held[c] != nil else { return false }
        if case .generate = request.kind, held[c] == nil { return false }
        held[c, default: []].append((request, context))
        return true
    }

    /// One generation of `connection` has ended: when it was the last, submits the requests held behind it.
    func generationEnded(_ connection: UInt64) {
        pendingLock.lock()
        openGenerations[connection, default: 1] -= 1
        var release: [(Graft_V1_Request, RequestContext)] = []
        if openGenerations[connection] == 0 {
            openGenerations[connection] = nil
            closed.remove(connection)
            release = held.removeValue(forKey: connection) ?? []
        }
        pendingLock.unlock()
        for (request, context) in release where !submit(request, context: context) {
            emit(.reply(context, Self.errorResponse(id: context.id, GraftError(.state, "the daemon is shutting down")), final: true))
        }
    }

    /// The connection closed: its running generations stop at the next step and its held requests are dropped.
    func connectionClosed(_ connection: UInt64) {
        pendingLock.lock()
        held[connection] = nil
        if openGenerations[connection] != nil { closed.insert(connection) }
        pendingLock.unlock()
    }

    /// Which of `connections` have closed.
    func closedConnections(_ connections: [UInt64]) -> Set<UInt64> {
        pendingLock.lock()
        defer { pendingLock.unlock() }
        return Set(connections.filter { closed.contains($0) })
    }

    /// Batched generation's counters (thread-safe).
    var generationStatistics: GenerationStatistics {
        pendingLock.lock()
        defer { pendingLock.unlock() }
        return generationCounts
    }

    /// Prepares the request's prompt (text, optionally in the chat template, or token ids) and admits it to its
    /// model's batch; returns false when it ran alone instead (an adapter setup that cannot be routed per row),
    /// streaming each token as a non-final response and then answering with all of them.
    func generate(_ r: Graft_V1_Generate, _ context: RequestContext) throws -> Bool {
        let s = try session(r.modelID)
        guard r.promptIds.isEmpty || r.prompt.isEmpty else {
            throw GraftError.invalid("generate: give prompt_ids or prompt, not both")
        }
        let prompt: [Int32]
        if r.promptIds.isEmpty {
            guard !r.prompt.isEmpty else { throw GraftError.invalid("generate: the prompt is empty") }
            prompt = s.model.encode(r.chat ? try s.chatPrompt(r.prompt) : r.prompt)
        } else {
            prompt = r.promptIds
        }
        let options = try Self.samplingOptions(r)
        let parameters = options.generationParameters(stopTokens: [])
        var adapter: String?
        if case .adapter(let name)? = r.adapterSet { adapter = name }
        pendingLock.lock()
        generationCounts.requests += 1
        pendingLock.unlock()
        if let g = try s.prepareBatchedGeneration(prompt: prompt, parameters: parameters, stopAtEOS: options.stopAtEOS,
                                                  adapter: adapter, contextLimit: settings.contextLimit,
                                                  prefixCache: promptCache(r.modelID)) {
            admit(g, modelID: r.modelID, context: context)
            return true
        }
        if let limit = settings.contextLimit, prompt.count + parameters.maxNewTokens > limit {
            throw GraftError.invalid("generate: the prompt (\(prompt.count) tokens) + max_new_tokens (\(parameters.maxNewTokens)) exceed the context limit of \(limit)")
        }
        let ids = try s.generate(prompt: prompt, parameters: parameters, stopAtEOS: options.stopAtEOS) { id, piece in
            reply(context, final: false) { $0.token = .with { $0.tokenID = id; $0.text = piece } }
            return true
        }
        pendingLock.lock()
        generationCounts.tokens += UInt64(ids.count)
        pendingLock.unlock()
        let text = s.model.decode(ids)
        reply(context) { $0.generated = .with { $0.ids = ids; $0.text = text } }
        return false
    }
}
