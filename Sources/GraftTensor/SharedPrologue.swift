import CGraftThreads

/// The parts of a group of products' decoding updates (``DecodingUpdate``: the adapters' down projections of a
/// decoding step), as items the job's threads claim one at a time: each thread first prepares whatever parts are
/// left, then computes its share of the products, so the parts run in parallel beside the products instead of on
/// the calling thread before them. A thread about to apply an update whose parts are still unclaimed prepares them
/// itself, so no schedule of the chunks can wait forever.
final class SharedPrologue {
    private let products: [FrozenProduct]
    /// The input as the fast mode's products quantized it, which the parts may read.
    private let quantized: Int8Rows?
    private let count: Int
    /// One allocation holds the claim counter, where each product's items start (product `j`'s parts are items
    /// `starts[j] ..< starts[j] + parts`), and a finished flag per item: a decoding step makes one of these per
    /// product group, a few hundred per token.
    private let memory: UnsafeMutableRawPointer
    private let next: UnsafeMutablePointer<Int64>
    private let starts: UnsafeMutablePointer<Int>
    private let finished: UnsafeMutablePointer<Int32>

    /// The parts of every product's update in order, or nil when there are none; `quantized` is the input as the
    /// fast mode's products quantized it.
    init?(_ products: [FrozenProduct], quantized: Int8Rows?) {
        var count = 0
        for product in products { count += product.update?.parts ?? 0 }
        guard count > 0 else { return nil }
        self.products = products
        self.quantized = quantized
        self.count = count
        let p = products.count
        memory = .allocate(byteCount: 8 + 8 * p + 4 * count, alignment: 8)
        next = memory.initializeMemory(as: Int64.self, repeating: 0, count: 1)
        starts = (memory + 8).initializeMemory(as: Int.self, repeating: 0, count: p)
        finished = (memory + 8 + 8 * p).initializeMemory(as: Int32.self, repeating: 0, count: count)
        var start = 0
        for (j, product) in products.enumerated() {
            starts[j] = start
            start += product.update?.parts ?? 0
        }
    }

    deinit { memory.deallocate() }

    /// Claims and prepares parts until every item below `end` is claimed.
    func runUnclaimed(below end: Int? = nil) {
        let limit = Int64(end ?? count), last = products.count - 1
        while true {
            let item = Int(cgraft_claim_next(next, limit))
            guard item >= 0, item < count else { return }
            var product = 0
            while product < last && starts[product + 1] <= item { product += 1 }
            products[product].update?.prepare(item - starts[product], quantized: quantized)
            cgraft_mark_finished(finished + item)
        }
    }

    /// Returns once every part of product `index`'s update has been prepared (preparing those nobody has claimed).
    func finish(product index: Int) {
        let parts = products[index].update?.parts ?? 0
        guard parts > 0 else { return }
        let start = starts[index]
        runUnclaimed(below: start + parts)
        for item in start..<(start + parts) { cgraft_wait_finished(finished + item) }
    }
}
