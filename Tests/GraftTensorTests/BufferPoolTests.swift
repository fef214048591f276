import Testing
@testable import GraftTensor

/// The block cache behind large tensors: blocks are reused by size, reused blocks come back zeroed when asked,
/// and memory mapped (live plus cached) stays within 1/8 above the most that was live at once, whatever sizes
/// follow.
@Suite struct BufferPoolTests {
    @Test func reusesBlocksBySizeAndMapsAtMostAnEighthAboveThePeakLive() throws {
        let pool = BufferPool()
        let kib = 1 << 10
        let first = try #require(pool.take(256 * kib))
        #expect(first.fresh)
        pool.give(first.pointer, bytes: 256 * kib)
        let again = try #require(pool.take(256 * kib))
        #expect(!again.fresh && again.pointer == first.pointer)
        pool.give(again.pointer, bytes: 256 * kib)

        // Shapes that change every "step" (packed batches): each step holds three blocks of new sizes at once,
        // large enough that the cache has to give blocks back to stay within its margin.
        var peakLive = 256 * kib
        for step in 0..<40 {
            let sizes = [30_000 + step, 70_000 + 3 * step, 9_000 + step].map { $0 * kib }
            let blocks = sizes.compactMap { pool.take($0) }
            #expect(blocks.count == 3)
            peakLive = max(peakLive, sizes.map(BufferPool.mappedSize).reduce(0, +))
            for (block, size) in zip(blocks, sizes) { pool.give(block.pointer, bytes: size) }
            let stats = pool.statistics
            let budget = peakLive + max(peakLive / BufferPool.slackDivisor, BufferPool.minimumSlack)
            #expect(stats.peakMapped <= budget, "step \(step): mapped \(stats.peakMapped) > peak live \(peakLive) + 1/8")
            #expect(stats.mapped == stats.cached)
        }
        pool.releaseCached()
        #expect(pool.statistics.mapped == 0 && pool.statistics.cached == 0)
    }

    @Test func reusedLargeBuffersAreZeroedWhenAskedFor() {
        for _ in 0..<3 {
            let buffer = TensorBuffer(count: 100_000)
            #expect((0..<buffer.count).allSatisfy { buffer.pointer[$0] == 0 })
            buffer.pointer.update(repeating: .nan, count: buffer.count)
        }
    }
}
