import ArgumentParser
import Foundation
import Graft

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time forward passes (median of several runs); used by bench/.",
        subcommands: [Forward.self])

    struct Forward: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Forward-pass time for a batch of random tokens.")

        @Option(help: "Model path or asset name.")
        var model: String
        @Option(help: "Batch size.")
        var batch: Int = 4
        @Option(help: "Tokens per sequence.")
        var length: Int = 64
        @Option(help: "Timed runs (the median is reported).")
        var runs: Int = 5
        @Option(help: "Untimed warm-up runs.")
        var warmup: Int = 1
        @Option(help: "Threads for Graft and OpenBLAS.")
        var threads: Int = 2

        func run() throws {
            try graft.run {
                Threading.setThreads(threads)
                let m = try GraftModel(path: resolveModelPath(model))
                var rng = GraftRNG(seed: 1)
                let vocab = m.tokenizer.vocabularySize
                let ids = (0..<(batch * length)).map { _ in Int32(1000 + Int(rng.next() % UInt64(max(1, vocab - 2000)))) }
                let tokens = try TokenBatch(ids: ids, batchSize: batch, length: length)
                var times: [Double] = []
                for i in 0..<(warmup + runs) {
                    let start = DispatchTime.now().uptimeNanoseconds
                    _ = try withNoGrad { try m.forward(tokens) }
                    let t = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                    if i >= warmup { times.append(t) }
                }
                times.sort()
                let median = times[times.count / 2]
                print(String(format: "graft forward %@ B%d×T%d threads=%d: median %.4f s (min %.4f, max %.4f, %d runs), %.0f tokens/s",
                             m.architecture.rawValue, batch, length, threads, median, times.first ?? 0, times.last ?? 0,
                             runs, Double(batch * length) / median))
            }
        }
    }
}
