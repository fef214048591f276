import CGraftSystem
import CGraftKernels
import CGraftThreads
import Dispatch

/// Graft's one parallel-for: splits `0..<count` into chunks of at least `grain` and runs them on the
/// available cores. Runs inline when the work is small or only one thread is configured.
///
/// The chunks run on Graft's worker pool (`CGraftThreads`), whose workers poll for the next job for a short while
/// (`GRAFT_SPIN_US`, default 200 µs) before sleeping: a decoding step issues about sixty short products per token,
/// and waking a sleeping thread for each costs as much as the product. A call made while the pool is busy (from
/// inside a chunk, or from another thread) runs on libdispatch instead.
///
/// OpenBLAS owns its own threads for large GEMMs; callers never run a `parallelFor` around calls that
/// may themselves go multi-threaded in BLAS (see ``Threading``).
public func parallelFor(_ count: Int, grain: Int = 1, _ body: (Range<Int>) -> Void) {
    let threads = Threading.threads
    guard count > 0 else { return }
    let chunks = min(threads, (count + max(grain, 1) - 1) / max(grain, 1))
    if chunks <= 1 {
        body(0..<count)
        return
    }
    let per = (count + chunks - 1) / chunks
    withoutActuallyEscaping(body) { body in
        var job = ParallelJob(count: count, per: per, body: body)
        let ran = withUnsafeMutablePointer(to: &job) { pointer in
            cgraft_pool_run(Int32(clamping: threads), Int64(chunks), { context, chunk in
                guard let job = context?.assumingMemoryBound(to: ParallelJob.self) else { return }
                job.pointee.run(Int(chunk))
            }, pointer)
        }
        if ran == 0 { return }
        let box = UncheckedSendable(job)
        DispatchQueue.concurrentPerform(iterations: chunks) { c in box.value.run(c) }
    }
}

/// One parallelFor call as the worker pool sees it: chunk `c` covers `c·per ..< min(count, (c+1)·per)`.
private struct ParallelJob {
    let count: Int
    let per: Int
    let body: (Range<Int>) -> Void

    func run(_ chunk: Int) {
        let lo = chunk * per
        let hi = min(count, lo + per)
        if lo < hi { body(lo..<hi) }
    }
}

/// Carries a value across a concurrency boundary the caller has made safe (disjoint ranges, joined before return).
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// Process-wide thread settings for Graft's own loops and for OpenBLAS.
public enum Threading {
    nonisolated(unsafe) private static var configured: Int = 0

    /// Threads Graft's loops use (defaults to `GRAFT_NUM_THREADS`, else the number of cores).
    public static var threads: Int {
        if configured > 0 { return configured }
        return defaultThreads
    }

    /// Sets the number of threads Graft's loops and GEMM splits use. Call before starting work.
    public static func setThreads(_ n: Int) {
        configured = max(1, n)
        blasSingleThreaded
    }

    /// OpenBLAS runs every call on its caller's thread; Graft splits large GEMMs across its own threads
    /// instead, so two thread pools never compete (OpenBLAS's idle workers spin and steal the cores).
    static let blasSingleThreaded: Void = { openblas_set_num_threads(1) }()

    /// The OpenBLAS kernels Graft chose by the CPU's features when it loaded ("SkylakeX", "Haswell", ...): OpenBLAS
    /// picks by CPU model and falls back to its SSE3 kernels on a model newer than its build. Nil when OpenBLAS's
    /// own choice stood (or `OPENBLAS_CORETYPE` was set).
    public static var blasCoreOverride: String? { cgraft_blas_core().map { String(cString: $0) } }

    private static let defaultThreads: Int = {
        blasSingleThreaded
        if let s = getenvString("GRAFT_NUM_THREADS"), let n = Int(s), n > 0 { return n }
        return max(1, ProcessInfoLite.activeProcessorCount)
    }()
}

func getenvString(_ name: String) -> String? {
    guard let p = getenv(name) else { return nil }
    return String(cString: p)
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

enum ProcessInfoLite {
    static var activeProcessorCount: Int {
        Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    }
}
