import ArgumentParser
import Foundation
import Graft

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time forward passes (median of several runs); used by bench/.",
        subcommands: [Forward.self, TrainStep.self])

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

    struct TrainStep: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "train-step",
            abstract: "Time one LoRA training step (forward, backward, AdamW) on random full-length sequences.")

        @Option(help: "Model path or asset name (minilm: seq-cls with the classifier trained; smollm2: causal LM).")
        var model: String
        @Option(help: "Batch size.") var batch: Int = 4
        @Option(help: "Tokens per sequence.") var length: Int = 64
        @Option(help: "Comma-separated target modules.") var targets: String?
        @Option(help: "LoRA rank.") var r: Int = 8
        @Option(help: "Timed steps (the median is reported).") var runs: Int = 5
        @Option(help: "Untimed warm-up steps.") var warmup: Int = 2
        @Option(help: "Threads.") var threads: Int = 2

        func run() throws {
            try graft.run {
                Threading.setThreads(threads)
                let path = resolveModelPath(model)
                let probe = try GraftModel(path: path)
                let isBert = probe.architecture == .bert
                var config = TrainerConfig()
                config.batchSize = batch
                config.maxGradNorm = nil
                var adapter: [String: Any] = ["peft_type": "LORA", "r": r, "lora_alpha": 2 * r]
                adapter["target_modules"] = targets.map { $0.split(separator: ",").map(String.init) }
                    ?? (isBert ? ["query", "value"] : ["q_proj", "v_proj"])
                if isBert { adapter["modules_to_save"] = ["classifier"] }
                let session = try FineTuneSession(spec: FineTuneSpec(
                    modelPath: path, task: isBert ? .sequenceClassification : .causalLM, adapterConfig: adapter, trainer: config))
                var rng = GraftRNG(seed: 3)
                let vocab = probe.tokenizer.vocabularySize
                let examples = (0..<batch).map { i -> TokenizedExample in
                    let ids = (0..<length).map { _ in Int32(1000 + Int(rng.next() % UInt64(vocab - 2000))) }
                    return isBert ? TokenizedExample(ids: ids, label: Int32(i % 3))
                                  : TokenizedExample(ids: ids, targets: Array(ids.dropFirst()) + [-100])
                }
                let packed = try PackedBatch(ArraySlice(examples))
                var times: [Double] = []
                for i in 0..<(warmup + runs) {
                    let start = DispatchTime.now().uptimeNanoseconds
                    _ = try session.trainer.step(packed, totalSteps: 1_000)
                    let t = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                    if i >= warmup { times.append(t) }
                }
                times.sort()
                var usage = rusage()
                getrusage(RUSAGE_SELF.rawValue, &usage)
                print(String(format: "graft train-step %@ B%d×T%d LoRA r%d on %@, %d trainable, threads=%d: median %.4f s/step (min %.4f, max %.4f, %d steps after %d warm-up), peak RSS %.2f GB",
                             probe.architecture.rawValue, batch, length, r,
                             (adapter["target_modules"] as? [String] ?? []).joined(separator: ","), session.trainableParameters,
                             threads, times[times.count / 2], times.first ?? 0, times.last ?? 0, runs, warmup,
                             Double(usage.ru_maxrss) / 1_048_576))
            }
        }
    }
}
