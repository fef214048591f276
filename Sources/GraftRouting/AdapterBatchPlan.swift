import GraftModels
import GraftTensor

/// One contiguous run of batch rows that share an adapter.
public struct AdapterSegment: Sendable, Equatable {
    /// The adapter's id (its position in ``GraftAdapters/AdaptedModel/adapters``), or -1 for the base model.
    public var adapterId: Int32
    /// The batch rows of the run (in the order the batch is run).
    public var rows: Range<Int>

    /// Creates a segment.
    public init(adapterId: Int32, rows: Range<Int>) {
        self.adapterId = adapterId
        self.rows = rows
    }

    /// The runs of equal consecutive ids in `ids` (any order; sorting first minimises the number of runs).
    public static func runs(of ids: [Int32]) -> [AdapterSegment] {
        var out: [AdapterSegment] = []
        var start = 0
        while start < ids.count {
            var end = start + 1
            while end < ids.count && ids[end] == ids[start] { end += 1 }
            out.append(AdapterSegment(adapterId: ids[start], rows: start..<end))
            start = end
        }
        return out
    }
}

/// How a mixed-adapter batch is run: its rows reordered so that rows sharing an adapter are contiguous, the
/// segments of that order, and the way back to the caller's order.
///
/// A *row* is one row of a ``GraftModels/TokenBatch`` (one sequence when the batch is not packed; every
/// sequence packed into a row shares that row's adapter).
public struct AdapterBatchPlan: Sendable {
    /// The ids in the caller's row order.
    public let adapterIds: [Int32]
    /// `order[i]` is the caller's row that runs at position `i` (a stable sort by adapter id).
    public let order: [Int]
    /// The ids in run order (grouped).
    public let sortedIds: [Int32]
    /// Contiguous runs of the run order, one per distinct id.
    public let segments: [AdapterSegment]

    /// Validates `adapterIds` against `adapterCount` adapters (each id in `-1..<adapterCount`) and groups them.
    public init(adapterIds: [Int32], adapterCount: Int) throws {
        if let bad = adapterIds.firstIndex(where: { $0 < -1 || Int($0) >= adapterCount }) {
            throw GraftError.invalid("adapter_ids[\(bad)] = \(adapterIds[bad]) names no adapter (have \(adapterCount); -1 = base)")
        }
        self.adapterIds = adapterIds
        order = adapterIds.indices.sorted { (adapterIds[$0], $0) < (adapterIds[$1], $1) }
        sortedIds = order.map { adapterIds[$0] }
        segments = AdapterSegment.runs(of: sortedIds)
    }

    /// Whether the run order is the caller's order (no gather or scatter needed).
    public var isIdentity: Bool { order.enumerated().allSatisfy { $0.offset == $0.element } }

    /// `batch` with its rows in run order (ids, lengths and any per-token fields).
    public func gather(_ batch: TokenBatch) throws -> TokenBatch {
        guard batch.batchSize == order.count else {
            throw GraftError.invalid("\(order.count) adapter ids for \(batch.batchSize) rows")
        }
        if isIdentity { return batch }
        let t = batch.length
        func rows<T>(_ values: [T]) -> [T] {
            var out: [T] = []
            out.reserveCapacity(values.count)
            for r in order { out += values[(r * t)..<((r + 1) * t)] }
            return out
        }
        return try TokenBatch(ids: rows(batch.ids), batchSize: batch.batchSize, length: t,
                              lengths: order.map { batch.lengths[$0] }, tokenTypes: batch.tokenTypes.map(rows),
                              positions: batch.positions.map(rows), segments: batch.segments.map(rows))
    }

    /// Output rows of `perRow` values each, computed in run order, put back in the caller's order.
    public func scatter(_ values: [Float], perRow: Int) -> [Float] {
        if isIdentity { return values }
        var out = [Float](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                guard let s = src.baseAddress, let d = dst.baseAddress else { return }
                for (i, r) in order.enumerated() { (d + r * perRow).update(from: s + i * perRow, count: perRow) }
            }
        }
        return out
    }
}
