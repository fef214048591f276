import CGraftThreads

/// The parts of a group of products' decoding updates (``DecodingUpdate``: the adapters' down projections of a
/// decoding step), as items the job's threads claim one at a time: each thread first prepares whatever parts are
/// left, then computes its share of the products, so the parts run in parallel beside the products instead of on
/// the calling thread before them. A thread about to apply an update whose parts are still unclaimed prepares them
/// itself, so no schedule of the chunks can wait forever.
final class SharedPrologue {
    private let updates: [DecodingUpdate?]
    /// Product `j`'s parts are items `starts[j] ..< starts[j] + updates[j].parts`.
    private let starts: [Int]
    private let count: Int
    private let next: UnsafeMutablePointer<Int64>
    private let finished: UnsafeMutablePointer<Int32>

    /// The parts of every product's update in order, or nil when there are none.
    init?(_ updates: [DecodingUpdate?]) {
        var starts: [Int] = [], count = 0
        for update in updates {
            starts.append(count)
            count += update?.parts ?? 0
        }
        guard count > 0 else { return nil }
        self.updates = updates
        self.starts = starts
        self.count = count
        next = .allocate(capacity: 1)
        next.initialize(to: 0)
        finished = .allocate(capacity: count)
        finished.initialize(repeating: 0, count: count)
    }

    deinit {
        next.deallocate()
        finished.deallocate()
    }

    /// Claims and prepares parts until every item below `end` is claimed.
    func runUnclaimed(below end: Int? = nil) {
        let limit = Int64(end ?? count)
        while true {
            let item = Int(cgraft_claim_next(next, limit))
            guard item >= 0, item < count else { return }
            var product = 0
            while product + 1 < starts.count && starts[product + 1] <= item { product += 1 }
            updates[product]?.prepare(item - starts[product])
            cgraft_mark_finished(finished + item)
        }
    }

    /// Returns once every part of product `index`'s update has been prepared (preparing those nobody has claimed).
    func finish(product index: Int) {
        let parts = updates[index]?.parts ?? 0
        guard parts > 0 else { return }
        let start = starts[index]
        runUnclaimed(below: start + parts)
        for item in start..<(start + parts) { cgraft_wait_finished(finished + item) }
    }
}
