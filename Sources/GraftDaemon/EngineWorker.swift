import Foundation

/// The dedicated thread that runs all engine work (models are used from one thread at a time).
///
/// Work items run in submission order. A training job runs as one long item whose progress callback calls
/// ``runPending()`` between optimizer steps, so other clients' requests (forward passes, adapter operations,
/// generation) are served while the job trains; items that would start another training job wait until the
/// running one ends.
final class EngineWorker: @unchecked Sendable {
    /// One unit of work.
    struct Item {
        /// Whether the item starts a training job (such items never run nested inside another job).
        var startsJob: Bool
        /// The work.
        var run: () -> Void
    }

    private let condition = NSCondition()
    private var items: [Item] = []
    private var stopping = false
    private var nesting = 0

    /// Items submitted but not yet started.
    var queueDepth: Int {
        condition.lock()
        defer { condition.unlock() }
        return items.count
    }

    /// Starts the thread; `onExit` runs on it after ``stop()`` once the queue is drained.
    ///
    /// The running thread keeps the worker alive (its block holds it) and Foundation releases the thread when it
    /// ends. The worker must not hold the thread in turn: that cycle kept the worker, its queue and through it the
    /// whole engine (loaded models included) alive after the daemon was gone (found by LeakSanitizer).
    func start(onExit: @escaping @Sendable () -> Void) {
        let thread = Thread { [self] in
            while let item = nextItem(blocking: true, allowJobs: true) { item.run() }
            onExit()
        }
        thread.name = "graftd-engine"
        thread.stackSize = 16 << 20
        thread.start()
    }

    /// Queues `item`; false once the worker is stopping.
    @discardableResult
    func submit(_ item: Item) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard !stopping else { return false }
        items.append(item)
        condition.signal()
        return true
    }

    /// Lets the thread finish the queued items and exit.
    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        condition.unlock()
    }

    /// Runs the queued items that do not start a job, now, on the calling (worker) thread. Called by a training
    /// job between steps.
    func runPending() {
        nesting += 1
        defer { nesting -= 1 }
        while let item = nextItem(blocking: false, allowJobs: false) { item.run() }
    }

    private func nextItem(blocking: Bool, allowJobs: Bool) -> Item? {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let index = items.firstIndex(where: { allowJobs || !$0.startsJob }) {
                return items.remove(at: index)
            }
            if !blocking || stopping { return nil }
            condition.wait()
        }
    }
}
