/// What a forward request asks for beyond its tokens: the one definition of these options, their defaults and
/// their checks. The C ABI's `graft_model_forward` (`output`, `adapter_ids`), graftd's `Forward` and the
/// bindings all translate into it; the tokens themselves are checked by ``GraftSession/tokenBatch(ids:lengths:batch:stride:)``.
public struct ForwardOptions: Sendable, Equatable {
    /// The output; nil = the model's default (logits where it has a head, else hidden states). Default nil.
    public var output: SessionOutput? = nil
    /// One adapter per row (an index into the model's adapters in the order they were added, -1 = the base
    /// model); nil = the current adapter state for every row. Default nil.
    public var adapterIds: [Int32]? = nil

    /// The defaults: the model's default output, the current adapter state.
    public init() {}

    /// The output that `session` produces for a request of `rows` rows with these options; throws naming the
    /// field at fault (`adapter_ids` of the wrong length or naming no adapter, logits from a model without a head).
    public func validate(for session: GraftSession, rows: Int) throws -> SessionOutput {
        if let adapterIds {
            guard adapterIds.count == rows else {
                throw GraftError.invalid("adapter_ids has \(adapterIds.count) entries for \(rows) rows")
            }
            let count = session.adapted.adapters.count
            if let bad = adapterIds.firstIndex(where: { $0 < -1 || Int($0) >= count }) {
                throw GraftError.invalid("adapter_ids[\(bad)] = \(adapterIds[bad]) names no adapter (have \(count); -1 = base)")
            }
        }
        let resolved = output ?? session.defaultOutput
        if resolved == .logits, session.defaultOutput != .logits {
            throw GraftError(.unsupported, "output: a \(session.model.architecture.rawValue) model loaded as \(session.task.name) has no head, so no logits; ask for hidden states")
        }
        return resolved
    }
}

extension GraftSession {
    /// Runs `batch` as `options` ask (see ``forward(batch:adapterIds:output:)``), validating them first.
    public func forward(batch: TokenBatch, options: ForwardOptions) throws -> [Float] {
        let output = try options.validate(for: self, rows: batch.batchSize)
        return try forward(batch: batch, adapterIds: options.adapterIds, output: output)
    }
}
