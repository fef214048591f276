import CGraftMPI
import Foundation
import GraftTensor

/// MPI_COMM_WORLD through Open MPI, loaded at run time by `CGraftMPI` (libgraft and the CLI do not link libmpi,
/// so they run where MPI is not installed). Every collective is nonblocking underneath and waits at most
/// ``timeoutSeconds`` for the peers.
public final class MPIProcessGroup: ProcessGroup, @unchecked Sendable {
    /// This process's rank in MPI_COMM_WORLD.
    public let rank: Int
    /// The job's process count.
    public let size: Int
    /// Seconds a collective waits for the peers before throwing (0 = forever).
    public let timeoutSeconds: Double
    /// What the collectives moved so far.
    public private(set) var statistics = CommunicationStatistics()

    /// Loads `library` (nil: Open MPI's `libmpi.so.40`) and initializes MPI (unless the host already did).
    /// Throws `.unsupported` with the loader's reason when the library is missing or is not Open MPI.
    public init(library: String?, timeoutSeconds: Double) throws {
        var message = [CChar](repeating: 0, count: 512)
        let status = cgraft_mpi_init(library, &message, message.count)
        guard status == Int32(CGRAFT_MPI_OK) else {
            throw GraftError(.unsupported, "MPI: " + Self.text(message))
        }
        rank = Int(cgraft_mpi_rank())
        size = Int(cgraft_mpi_size())
        self.timeoutSeconds = timeoutSeconds
    }

    /// Runs one collective, counting its bytes and time; a failure or timeout becomes a `.io` error.
    private func collective(bytes: Int, _ body: (UnsafeMutablePointer<CChar>, Int) -> Int32) throws {
        var message = [CChar](repeating: 0, count: 512)
        let start = DispatchTime.now().uptimeNanoseconds
        let status = message.withUnsafeMutableBufferPointer { body($0.baseAddress!, $0.count) }
        statistics.calls += 1
        statistics.bytes += bytes
        statistics.seconds += Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
        guard status == Int32(CGRAFT_MPI_OK) else {
            throw GraftError(.io, "MPI: " + text(message))
        }
    }

    public func allreduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        try collective(bytes: buffer.count * 4) {
            cgraft_mpi_allreduce_float(base, Int64(buffer.count), timeoutSeconds, $0, $1)
        }
    }

    public func allreduceSum(_ values: inout [Double]) throws {
        let n = values.count
        guard n > 0 else { return }
        try values.withUnsafeMutableBufferPointer { b in
            guard let base = b.baseAddress else { return }
            try collective(bytes: n * 8) { cgraft_mpi_allreduce_double(base, Int64(n), timeoutSeconds, $0, $1) }
        }
    }

    public func allgather(_ values: [UInt64]) throws -> [[UInt64]] {
        let n = values.count
        guard n > 0 else { return Array(repeating: [], count: size) }
        var received = [UInt64](repeating: 0, count: n * size)
        try received.withUnsafeMutableBufferPointer { out in
            guard let outBase = out.baseAddress else { return }
            try collective(bytes: n * 8) { cgraft_mpi_allgather_u64(values, Int32(n), outBase, timeoutSeconds, $0, $1) }
        }
        return (0..<size).map { Array(received[($0 * n)..<(($0 + 1) * n)]) }
    }

    /// The C shim's NUL-terminated message.
    private func text(_ message: [CChar]) -> String { Self.text(message) }

    /// The C shim's NUL-terminated message.
    static func text(_ message: [CChar]) -> String {
        String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public func abort(code: Int32) {
        cgraft_mpi_abort(code)
        exit(code)
    }
}
