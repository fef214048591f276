import ArgumentParser
import Foundation
import Graft

/// The machine-readable result line of a `graft bench` run: `BENCH_JSON {...}`, the last line it prints, with the
/// process's peak resident set size added. `bench/compare` reads it; people read the line above it.
func printBenchJSON(_ fields: [String: Any]) {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    var object = fields
    object["engine"] = "graft"
    object["peak_rss_kb"] = Int(usage.ru_maxrss)
    let text = (try? GraftSession.jsonString(object)) ?? "{}"
    print("BENCH_JSON " + text)
}

/// CPU time (user + system, all threads) this process has used, in seconds: with wall time, how busy the
/// threads were; unlike wall time, little affected by other processes on a shared machine.
func processCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
}

/// Median of a non-empty list of times.
func benchMedian(_ times: [Double]) -> Double {
    let sorted = times.sorted()
    return sorted[sorted.count / 2]
}

extension Bench {
    /// Causal-LM LoRA training on real text (issue 12 workload f): consecutive batches of a JSONL file's
    /// examples (`{"text"}` or `{"prompt","completion"}`), in file order, one optimizer step each; reports tokens
    /// per second over the timed steps (real tokens: Graft packs, so there is no padding to count).
    struct TrainText: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "train-text",
            abstract: "Time causal-LM LoRA training steps on a JSONL file's texts; report tokens per second.")

        @Option(help: "Model path or asset name (a Llama decoder).") var model: String = "smollm2"
        @Option(help: "JSONL training data ({\"text\"} or {\"prompt\",\"completion\"}).") var data: String
        @Option(help: "Sequences per step.") var batch: Int = 8
        @Option(help: "Maximum tokens per example.") var maxLength: Int = 64
        @Option(help: "Comma-separated target modules.") var targets: String = "q_proj,v_proj"
        @Option(help: "LoRA rank.") var r: Int = 8
        @Option(help: "Learning rate.") var lr: Float = 2e-3
        @Option(help: "Timed steps.") var steps: Int = 20
        @Option(help: "Untimed warm-up steps (taken from the start of the data).") var warmup: Int = 2
        @Option(help: "Threads.") var threads: Int = 2
        @Option(name: .customLong("compute-dtype"), help: "Frozen weights' products: float32, bfloat16 or auto.")
        var computeDType: ComputeDType = .float32

        func run() throws {
            try graft.run {
                guard batch >= 1, steps >= 1, warmup >= 0 else { throw GraftError.invalid("--batch and --steps must be ≥ 1") }
                Threading.setThreads(threads)
                let session = try GraftSession(path: resolveModelPath(model), task: .causalLM, computeDType: computeDType)
                let adapter: [String: Any] = ["peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                              "target_modules": targets.split(separator: ",").map(String.init)]
                try session.addAdapter(name: "default", configJSON: try GraftSession.jsonString(adapter), seed: 42)
                var options = Graft.TrainingOptions()
                options.batchSize = batch
                options.maxLength = maxLength
                options.learningRate = lr
                options.warmupSteps = 0
                options.schedule = .constant
                let training = try GraftTrainingSession(session: session, adapterName: "default", options: options)
                let examples = try training.loadExamples(data)
                let needed = (warmup + steps) * batch
                guard examples.count >= needed else {
                    throw GraftError.invalid("\(data): \(examples.count) examples, \(needed) needed for \(warmup + steps) steps of \(batch)")
                }
                var times: [Double] = []
                var tokens = 0
                var lastLoss: Float = 0
                for s in 0..<(warmup + steps) {
                    let slice = Array(examples[(s * batch)..<((s + 1) * batch)])
                    let start = DispatchTime.now().uptimeNanoseconds
                    lastLoss = try training.step(slice)
                    let t = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                    if s >= warmup {
                        times.append(t)
                        tokens += slice.reduce(0) { $0 + $1.ids.count }
                    }
                }
                let total = times.reduce(0, +)
                print(String(format: "graft train-text causal LM, LoRA r%d on %@, B%d (max %d tokens), threads=%d: %.0f tokens/s over %d steps after %d warm-up (median %.4f s/step, last loss %.4f)",
                             r, targets, batch, maxLength, threads, Double(tokens) / total, steps, warmup, benchMedian(times), lastLoss))
                printBenchJSON(["workload": "train-text", "median_s": benchMedian(times), "times_s": times,
                                "tokens": tokens, "tokens_per_s": Double(tokens) / total, "last_loss": Double(lastLoss)])
            }
        }
    }
}
