import Foundation
import GraftTensor

/// The processes that train one adapter together (data parallelism): each holds the whole model, computes
/// gradients on its share of every global batch, and sums them with the others before an identical optimizer
/// step. A single process is the group of size 1, whose collectives do nothing.
///
/// Collectives must be called by every member in the same order (MPI's rule); a member that stops calling them
/// makes the others fail after ``timeoutSeconds``. Use a group from one thread at a time.
public protocol ProcessGroup: AnyObject, Sendable {
    /// This process's index, 0..<size; rank 0 evaluates, logs and saves.
    var rank: Int { get }
    /// The number of processes.
    var size: Int { get }
    /// What the collectives have moved and how long they took so far.
    var statistics: CommunicationStatistics { get }
    /// Replaces `buffer` with its element-wise sum over all members.
    func allreduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws
    /// Replaces `values` with their element-wise sum over all members.
    func allreduceSum(_ values: inout [Double]) throws
    /// Every member's `values` (all members pass the same count), indexed by rank.
    func allgather(_ values: [UInt64]) throws -> [[UInt64]]
    /// Ends every member of the job with `code` (MPI_Abort); for a member that cannot go on alone.
    func abort(code: Int32)
}

/// Counters of the collectives a ``ProcessGroup`` ran.
public struct CommunicationStatistics: Sendable, Equatable {
    /// Collective calls.
    public var calls = 0
    /// Payload bytes handed to the collectives (each member's buffer; a ring allreduce sends about
    /// 2·(size−1)/size times this per member over the wire).
    public var bytes = 0
    /// Seconds spent inside the collectives, waiting for peers included.
    public var seconds: Double = 0

    /// Zero counters.
    public init() {}
}

/// The group of one process: collectives return their input unchanged.
public final class SingleProcessGroup: ProcessGroup, @unchecked Sendable {
    /// Always 0.
    public let rank = 0
    /// Always 1.
    public let size = 1
    /// Always zero.
    public let statistics = CommunicationStatistics()

    /// The group of this process alone.
    public init() {}
    /// Leaves `buffer` as it is.
    public func allreduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws {}
    /// Leaves `values` as they are.
    public func allreduceSum(_ values: inout [Double]) throws {}
    /// `[values]`.
    public func allgather(_ values: [UInt64]) throws -> [[UInt64]] { [values] }
    /// Exits the process with `code`.
    public func abort(code: Int32) { exit(code) }
}

/// The process group this process belongs to: MPI_COMM_WORLD when launched by Open MPI's `mpirun` (or when
/// `GRAFT_MPI=1` asks for it), else the single process. Decided once per process.
public enum ProcessGroups {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var cached: (any ProcessGroup)?

    /// Whether the environment asks for MPI: `GRAFT_MPI=1` forces it, `GRAFT_MPI=0` disables it, otherwise
    /// it is used exactly when Open MPI's launcher set `OMPI_COMM_WORLD_SIZE`.
    public static var mpiRequested: Bool {
        let env = ProcessInfo.processInfo.environment
        switch env["GRAFT_MPI"]?.lowercased() {
        case "1", "on", "true", "yes": return true
        case "0", "off", "false", "no": return false
        default: return env["OMPI_COMM_WORLD_SIZE"] != nil
        }
    }

    /// The world group. Loads Open MPI on first use when ``mpiRequested``; throws `.unsupported` naming
    /// libmpi.so.40 and the Debian packages when it cannot be loaded (`GRAFT_MPI_LIBRARY` names another path).
    public static func world() throws -> any ProcessGroup {
        lock.lock()
        defer { lock.unlock() }
        if let cached { return cached }
        let group: any ProcessGroup
        if mpiRequested {
            let env = ProcessInfo.processInfo.environment
            group = try MPIProcessGroup(library: env["GRAFT_MPI_LIBRARY"], timeoutSeconds: try timeout(env))
        } else {
            group = SingleProcessGroup()
        }
        cached = group
        return group
    }

    /// The world group when it is already known or needs no MPI; nil before an MPI world was created.
    public static var current: (any ProcessGroup)? {
        lock.lock()
        defer { lock.unlock() }
        return cached
    }

    /// `GRAFT_MPI_TIMEOUT` (seconds a collective may wait for peers; default 600, 0 = no limit).
    static func timeout(_ env: [String: String]) throws -> Double {
        guard let text = env["GRAFT_MPI_TIMEOUT"] else { return 600 }
        guard let value = Double(text), value >= 0, value.isFinite else {
            throw GraftError.invalid("GRAFT_MPI_TIMEOUT must be a number of seconds ≥ 0, got '\(text)'")
        }
        return value
    }
}
