import CGraftThreads
import Dispatch
import Foundation
import Testing
@testable import GraftTensor

/// parallelFor on the worker pool: every index runs exactly once, whatever the chunking, nesting or callers.
@Suite struct ParallelForTests {
    /// Counts how often each index of `0..<count` ran, with a lock (the test's own bookkeeping must not race).
    final class Tally: @unchecked Sendable {
        private let lock = NSLock()
        private var counts: [Int]
        init(_ count: Int) { counts = [Int](repeating: 0, count: count) }
        func add(_ range: Range<Int>) {
            lock.lock()
            for i in range { counts[i] += 1 }
            lock.unlock()
        }
        var exactlyOnce: Bool { counts.allSatisfy { $0 == 1 } }
        var none: Bool { counts.allSatisfy { $0 == 0 } }
    }

    @Test func everyIndexRunsOnceAcrossChunkings() {
        Threading.setThreads(2)
        for count in [1, 2, 3, 7, 64, 1000] {
            for grain in [1, 3, 64] {
                let tally = Tally(count)
                parallelFor(count, grain: grain) { tally.add($0) }
                #expect(tally.exactlyOnce, "count \(count) grain \(grain)")
            }
        }
    }

    @Test func thousandsOfBackToBackJobsEachCoverTheirRange() {
        Threading.setThreads(2)
        // The decoding pattern: many short jobs in a row, each reading what the previous one wrote.
        var values = [Int](repeating: 0, count: 256)
        for round in 1...5000 {
            values.withUnsafeMutableBufferPointer { buffer in
                let box = UncheckedSendable(buffer)
                parallelFor(buffer.count, grain: 16) { range in
                    for i in range { box.value[i] += 1 }
                }
            }
            if round % 1000 == 0 { #expect(values.allSatisfy { $0 == round }, "after \(round) jobs") }
        }
    }

    @Test func nestedCallsRunInsideTheOuterChunk() {
        Threading.setThreads(2)
        let outer = Tally(4)
        let inner = Tally(4 * 50)
        parallelFor(4) { range in
            outer.add(range)
            for i in range { parallelFor(50) { inner.add(($0.lowerBound + 50 * i)..<($0.upperBound + 50 * i)) } }
        }
        #expect(outer.exactlyOnce)
        #expect(inner.exactlyOnce)
    }

    @Test func concurrentCallersFromSeveralThreads() {
        Threading.setThreads(2)
        let callers = 4, count = 500
        let failures = Tally(callers)  // index c counts caller c's jobs that missed or repeated an index
        DispatchQueue.concurrentPerform(iterations: callers) { c in
            for _ in 0..<200 {
                let tally = Tally(count)
                parallelFor(count, grain: 8) { tally.add($0) }
                if !tally.exactlyOnce { failures.add(c..<(c + 1)) }
            }
        }
        #expect(failures.none, "jobs with a missing or repeated index")
    }

    @Test func poolRefusesEmptyTaskAndReportsWorkers() {
        #expect(cgraft_pool_run(2, 0, nil, nil) == 0)
        #expect(cgraft_pool_run(2, 4, nil, nil) == -1)
        Threading.setThreads(2)
        parallelFor(8) { _ in }
        #expect(cgraft_pool_workers() >= 1)
    }
}
