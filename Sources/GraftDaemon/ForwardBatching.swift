import Foundation
import Graft

/// Forward passes: requests for one model from different connections are batched into one engine pass and
/// each answered with its own rows.
extension Engine {
    /// A forward request checked and tokenized, waiting to run alone or batched with others.
    struct PreparedForward {
        var context: RequestContext
        var rows: [[Int32]]
        var output: SessionOutput
    }

    /// Forward requests of different connections for the same model that arrive while one is queued run
    /// together as one batch (up to these limits), each answered with its own rows.
    static let maxBatchedSequences = 64
    static let maxBatchedTokens = 32768

    /// Queues a forward request: it joins the model's pending batch when that cannot reorder its connection's
    /// requests (the connection has nothing else queued), else it is queued on its own.
    func submitForward(_ r: Graft_V1_Forward, context: RequestContext) -> Bool {
        pendingLock.lock()
        let idle = queued[context.connection, default: 0] == 0
        queued[context.connection, default: 0] += 1
        if idle, pendingForwards[r.modelID] != nil {
            pendingForwards[r.modelID]?.append((r, context))
            pendingLock.unlock()
            return true
        }
        let startsBatch = pendingForwards[r.modelID] == nil
        if startsBatch { pendingForwards[r.modelID] = [(r, context)] }
        pendingLock.unlock()
        let accepted = worker.submit(.init(startsJob: false) { [self] in
            if startsBatch {
                pendingLock.lock()
                let batch = pendingForwards.removeValue(forKey: r.modelID) ?? []
                for (_, c) in batch { queued[c.connection, default: 1] -= 1 }
                pendingLock.unlock()
                runForwards(modelID: r.modelID, batch)
            } else {
                dequeued(context.connection)
                runForwards(modelID: r.modelID, [(r, context)])
            }
        })
        if !accepted { dequeued(context.connection) }
        return accepted
    }

    /// One of the connection's queued requests has started.
    func dequeued(_ connection: UInt64) {
        pendingLock.lock()
        queued[connection, default: 1] -= 1
        if queued[connection] == 0 { queued[connection] = nil }
        pendingLock.unlock()
    }

    /// Checks and tokenizes a forward request for model `s`; throws naming what is wrong.
    func prepareForward(_ r: Graft_V1_Forward, _ s: GraftSession, _ context: RequestContext) throws -> PreparedForward {
        guard r.sequences.isEmpty || r.texts.isEmpty else {
            throw GraftError.invalid("forward: give sequences or texts, not both")
        }
        let rows: [[Int32]] = r.texts.isEmpty ? r.sequences.map(\.ids) : r.texts.map { s.model.tokenizer.encode($0) }
        guard !rows.isEmpty else { throw GraftError.invalid("forward: no sequences and no texts") }
        if let empty = rows.firstIndex(where: \.isEmpty) {
            throw GraftError.invalid("forward: sequence \(empty) is empty")
        }
        _ = try tokenBatch(rows, s)  // validates ids and lengths against this model
        var options = ForwardOptions()
        options.output = try Self.sessionOutput(r.output)
        options.adapterIds = r.adapterIds.isEmpty ? nil : r.adapterIds
        let output = try options.validate(for: s, rows: rows.count)
        return PreparedForward(context: context, rows: rows, output: output)
    }

    /// `rows` padded into one token batch for `s` (validating ids and lengths).
    func tokenBatch(_ rows: [[Int32]], _ s: GraftSession) throws -> TokenBatch {
        let stride = rows.map(\.count).max() ?? 1
        var ids = [Int32](repeating: 0, count: rows.count * stride)
        for (b, row) in rows.enumerated() { ids.replaceSubrange((b * stride)..<(b * stride + row.count), with: row) }
        return try s.tokenBatch(ids: ids, lengths: rows.map(\.count), batch: rows.count, stride: stride)
    }

    /// Runs forward requests for one model: per-row adapter ids alone, the rest batched by output kind.
    func runForwards(modelID: String, _ requests: [(Graft_V1_Forward, RequestContext)]) {
        let s: GraftSession
        do {
            s = try session(modelID)
        } catch {
            for (_, c) in requests { emit(.reply(c, Self.errorResponse(id: c.id, error), final: true)) }
            return
        }
        var batchable: [PreparedForward] = []
        for (r, c) in requests {
            do {
                let p = try prepareForward(r, s, c)
                if r.adapterIds.isEmpty {
                    batchable.append(p)
                } else {
                    try answer([p], s, adapterIds: r.adapterIds)
                }
            } catch {
                emit(.reply(c, Self.errorResponse(id: c.id, error), final: true))
            }
        }
        for output in [SessionOutput.hidden, .logits] {
            var group = batchable.filter { $0.output == output }[...]
            while !group.isEmpty {
                var chunk: [PreparedForward] = []
                var sequences = 0, longest = 0
                while let next = group.first {
                    let n = next.rows.count, l = max(longest, next.rows.map(\.count).max() ?? 0)
                    if !chunk.isEmpty && (sequences + n > Self.maxBatchedSequences || (sequences + n) * l > Self.maxBatchedTokens) { break }
                    chunk.append(next)
                    sequences += n
                    longest = l
                    group = group.dropFirst()
                }
                do {
                    try answer(chunk, s, adapterIds: nil)
                } catch {
                    for p in chunk { emit(.reply(p.context, Self.errorResponse(id: p.context.id, error), final: true)) }
                }
            }
        }
    }

    /// One forward pass over the rows of `requests` (same output kind), each answered with its own rows cut to
    /// its own longest sequence.
    func answer(_ requests: [PreparedForward], _ s: GraftSession, adapterIds: [Int32]?) throws {
        guard let output = requests.first?.output else { return }
        let rows = requests.flatMap(\.rows)
        let batch = try tokenBatch(rows, s)
        let values = try s.forward(batch: batch, adapterIds: adapterIds, output: output)
        pendingLock.lock()
        forwardCounts.requests += UInt64(requests.count)
        forwardCounts.passes += 1
        pendingLock.unlock()
        let stride = batch.length
        let perRow = output == .logits && s.task == .sequenceClassification
        let width = perRow ? values.count / max(1, rows.count) : values.count / max(1, rows.count * stride)
        var offset = 0
        for p in requests {
            let n = p.rows.count
            let own = p.rows.map(\.count).max() ?? 1
            var out: [Float]
            let shape: [UInt32]
            if perRow {
                out = Array(values[(offset * width)..<((offset + n) * width)])
                shape = [UInt32(n), UInt32(width)]
            } else {
                out = [Float](repeating: 0, count: n * own * width)
                values.withUnsafeBufferPointer { src in
                    out.withUnsafeMutableBufferPointer { dst in
                        for b in 0..<n {
                            guard let from = src.baseAddress?.advanced(by: (offset + b) * stride * width),
                                  let to = dst.baseAddress?.advanced(by: b * own * width) else { continue }
                            to.update(from: from, count: own * width)
                        }
                    }
                }
                shape = [UInt32(n), UInt32(own), UInt32(width)]
            }
            let lengths = p.rows.map { UInt32($0.count) }
            reply(p.context) {
                $0.forward = .with {
                    $0.shape = shape
                    $0.values = out
                    $0.lengths = lengths
                }
            }
            offset += n
        }
    }
}
