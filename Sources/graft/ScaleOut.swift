import Foundation
import Graft

/// Data-parallel runs of `graft train` / `graft demo` under Open MPI's `mpirun` (README "Scale-out").
enum ScaleOut {
    /// Joins the process group (MPI_COMM_WORLD under mpirun, else this process alone) before anything is printed
    /// and, on ranks other than 0, sends stdout to /dev/null: rank 0 alone reports, evaluates and saves.
    /// Errors still reach stderr from every rank.
    @discardableResult
    static func join() throws -> any ProcessGroup {
        let group = try ProcessGroups.world()
        if group.rank != 0 {
            let null = open("/dev/null", O_WRONLY)
            if null >= 0 {
                dup2(null, STDOUT_FILENO)
                close(null)
            }
        }
        return group
    }

    /// A failed rank's last words: the error with its rank, then MPI_Abort so the other ranks end at once instead
    /// of waiting for this one in their next collective. Returns when this process is not part of an MPI job.
    static func abortJobIfDistributed(_ message: String) {
        guard let group = ProcessGroups.current, group.size > 1 else { return }
        FileHandle.standardError.write(Data("graft: error: rank \(group.rank) of \(group.size): \(message)\n".utf8))
        group.abort(code: 1)
    }

    /// The run's communication figures, printed by rank 0 when this is an MPI job: step time, allreduce time and
    /// payload bytes per optimizer step (the scale-out measurements; bench/scale-out parses this line).
    static func report(group: any ProcessGroup, steps: Int, trainSeconds: Double) {
        guard ProcessGroups.mpiRequested || group.size > 1, steps > 0 else { return }
        let s = group.statistics
        print(String(format: "scale-out  %d rank(s), step %.4f s, allreduce %.3f ms/step (%d calls), %d bytes/step",
                     group.size, trainSeconds / Double(steps), s.seconds * 1000 / Double(steps), s.calls,
                     s.bytes / steps))
    }
}
