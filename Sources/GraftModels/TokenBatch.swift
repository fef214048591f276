import GraftTensor

/// A batch of token sequences laid out `[batchSize, length]`, right-padded.
///
/// `lengths[b]` tokens of row `b` are real; the rest are padding that attention never looks at.
/// For packed training, `segments` gives each token's sequence id within its row and `positions` restart
/// at 0 for every packed sequence.
public struct TokenBatch: Sendable {
    /// Token ids, `batchSize * length`, row-major.
    public var ids: [Int32]
    /// Number of rows.
    public var batchSize: Int
    /// Tokens per row (including padding).
    public var length: Int
    /// Real tokens per row.
    public var lengths: [Int]
    /// Token type (segment A/B) ids for BERT; zeros when nil.
    public var tokenTypes: [Int32]?
    /// Position ids; `0..<length` per row when nil.
    public var positions: [Int32]?
    /// Packed-sequence ids per token; attention stays within a segment when set.
    public var segments: [Int32]?

    /// A batch from equal-length rows (`lengths` defaults to full rows).
    public init(ids: [Int32], batchSize: Int, length: Int, lengths: [Int]? = nil,
                tokenTypes: [Int32]? = nil, positions: [Int32]? = nil, segments: [Int32]? = nil) throws {
        guard batchSize >= 0, length >= 0, ids.count == batchSize * length else {
            throw GraftError.invalid("token batch: \(ids.count) ids do not fill \(batchSize) rows of \(length)")
        }
        let lens = lengths ?? [Int](repeating: length, count: batchSize)
        guard lens.count == batchSize else {
            throw GraftError.invalid("token batch: \(lens.count) lengths for \(batchSize) rows")
        }
        if let bad = lens.firstIndex(where: { $0 < 0 || $0 > length }) {
            throw GraftError.invalid("token batch: length \(lens[bad]) of row \(bad) outside 0...\(length)")
        }
        for (field, values) in [("tokenTypes", tokenTypes), ("positions", positions), ("segments", segments)] {
            if let values, values.count != ids.count {
                throw GraftError.invalid("token batch: \(field) has \(values.count) entries, expected \(ids.count)")
            }
        }
        self.ids = ids
        self.batchSize = batchSize
        self.length = length
        self.lengths = lens
        self.tokenTypes = tokenTypes
        self.positions = positions
        self.segments = segments
    }

    /// Right-pads variable-length sequences with `padId`.
    public init(sequences: [[Int32]], padId: Int32 = 0) throws {
        let length = sequences.map(\.count).max() ?? 0
        var ids: [Int32] = []
        ids.reserveCapacity(sequences.count * length)
        for s in sequences { ids += s + [Int32](repeating: padId, count: length - s.count) }
        try self.init(ids: ids, batchSize: sequences.count, length: length, lengths: sequences.map(\.count))
    }

    /// The real tokens of row `b` (its padding left out).
    public func row(_ b: Int) -> ArraySlice<Int32> { ids[(b * length)..<(b * length + lengths[b])] }

    /// Position ids for every token.
    public var resolvedPositions: [Int32] {
        if let positions { return positions }
        var p = [Int32](repeating: 0, count: ids.count)
        for b in 0..<batchSize { for t in 0..<length { p[b * length + t] = Int32(t) } }
        return p
    }

    /// Throws unless every id is in `0..<vocabularySize`, naming the first bad one and where it is.
    public func validate(vocabularySize: Int) throws {
        for (i, id) in ids.enumerated() where id < 0 || Int(id) >= vocabularySize {
            throw GraftError.invalid(
                "token id \(id) at row \(i / max(length, 1)), position \(i % max(length, 1)) is outside the vocabulary 0..<\(vocabularySize)")
        }
    }
}
