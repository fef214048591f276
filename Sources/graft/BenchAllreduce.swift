import ArgumentParser
import Foundation
import Graft

extension Bench {
    /// `graft bench allreduce`: the communication alone, for bench/scale-out and the cost model in docs/scaling.md.
    struct Allreduce: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Under mpirun: median time of one allreduce (sum) of float buffers of the given sizes.",
            discussion: "Each timed allreduce follows a one-element allreduce that lines the ranks up, so the "
                + "figure is the collective itself, not waiting for a slower rank. Rank 0 prints.")

        @Option(parsing: .upToNextOption, help: "Buffer sizes in bytes (multiples of 4).")
        var bytes: [Int] = [8, 299_660, 19_537_936]
        @Option(help: "Timed runs per size (the median is reported).")
        var runs: Int = 20

        func run() throws {
            try graft.run {
                let group = try ScaleOut.join()
                guard runs >= 1 else { throw GraftError.invalid("--runs must be ≥ 1, got \(runs)") }
                for size in bytes {
                    guard size >= 4 else { throw GraftError.invalid("--bytes must be ≥ 4, got \(size)") }
                    var buffer = [Float](repeating: 1, count: size / 4)
                    var line = [Double](repeating: 0, count: 1)
                    var times: [Double] = []
                    for run in 0..<(runs + 2) {
                        try group.allreduceSum(&line)
                        let start = DispatchTime.now().uptimeNanoseconds
                        try buffer.withUnsafeMutableBufferPointer { try group.allreduceSum($0) }
                        if run >= 2 { times.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9) }
                    }
                    times.sort()
                    let median = times[times.count / 2]
                    print(String(format: "allreduce  %d rank(s)  %11d bytes  median %9.3f ms  %8.1f MB/s (payload / time)",
                                 group.size, size, median * 1000, Double(size) / median / 1e6))
                }
            }
        }
    }
}
