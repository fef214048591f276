import ArgumentParser
import Foundation
import Graft
import GraftAssets

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time forward passes (median of several runs); used by bench/.",
        subcommands: [Forward.self, TrainStep.self, MixedAdapters.self, TrainText.self, SeedMerge.self, Continual.self,
                      Allreduce.self, Decode.self])

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
        @Option(name: .customLong("compute-dtype"), help: "Frozen weights' products: float32, bfloat16 or auto.")
        var computeDType: ComputeDType = .float32

        func run() throws {
            try graft.run {
                Threading.setThreads(threads)
                let m = try GraftModel(path: resolveModelPath(model))
                m.root.setComputeDType(computeDType)
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
                printBenchJSON(["workload": "forward", "median_s": median, "times_s": times])
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
        @Option(name: .customLong("compute-dtype"), help: "Frozen weights' products: float32, bfloat16 or auto.") var computeDType: ComputeDType = .float32

        func run() throws {
            try graft.run {
                Threading.setThreads(threads)
                let path = resolveModelPath(model)
                // Architecture and vocabulary from a model that is gone before the measured one loads.
                let (architecture, vocab) = try { () throws -> (GraftModel.Architecture, Int) in
                    let probe = try GraftModel(path: path)
                    return (probe.architecture, probe.tokenizer.vocabularySize)
                }()
                let isBert = architecture == .bert
                var options = Graft.TrainingOptions()
                options.batchSize = batch
                options.maxGradNorm = 0
                options.totalSteps = 1_000
                var adapter: [String: Any] = ["peft_type": "LORA", "r": r, "lora_alpha": 2 * r]
                adapter["target_modules"] = targets.map { $0.split(separator: ",").map(String.init) }
                    ?? (isBert ? ["query", "value"] : ["q_proj", "v_proj"])
                if isBert { adapter["modules_to_save"] = ["classifier"] }
                var modelOptions = ModelOptions()
                modelOptions.task = isBert ? .sequenceClassification : .causalLM
                modelOptions.numLabels = 3
                modelOptions.seed = options.seed
                modelOptions.computeDType = computeDType
                let model = try AssetCache.openSession(path, options: modelOptions)
                try model.addAdapter(name: "default", config: AdapterConfig(json: adapter, source: "bench adapter"), seed: options.seed)
                let session = try GraftTrainingSession(session: model, adapterName: "default", options: options)
                var rng = GraftRNG(seed: 3)
                let examples = (0..<batch).map { i -> TokenizedExample in
                    let ids = (0..<length).map { _ in Int32(1000 + Int(rng.next() % UInt64(vocab - 2000))) }
                    return isBert ? TokenizedExample(ids: ids, label: Int32(i % 3))
                                  : TokenizedExample(ids: ids, targets: Array(ids.dropFirst()) + [-100])
                }
                let packed = try PackedBatch(ArraySlice(examples))
                var times: [Double] = []
                var cpu = 0.0
                for i in 0..<(warmup + runs) {
                    let start = DispatchTime.now().uptimeNanoseconds
                    let cpuStart = processCPUSeconds()
                    _ = try session.trainer.step(packed, totalSteps: 1_000)
                    let t = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                    if i >= warmup { times.append(t); cpu += processCPUSeconds() - cpuStart }
                }
                times.sort()
                var usage = rusage()
                getrusage(RUSAGE_SELF.rawValue, &usage)
                print(String(format: "graft train-step %@ B%d×T%d LoRA r%d on %@, %d trainable, threads=%d%@: median %.4f s/step (min %.4f, max %.4f, %d steps after %d warm-up), peak RSS %.2f GB",
                             architecture.rawValue, batch, length, r,
                             (adapter["target_modules"] as? [String] ?? []).joined(separator: ","), session.trainableParameters,
                             threads, blasNote, times[times.count / 2], times.first ?? 0, times.last ?? 0, runs, warmup,
                             Double(usage.ru_maxrss) / 1_048_576))
                printBenchJSON(["workload": "train-step", "median_s": times[times.count / 2], "times_s": times,
                                "cpu_s_per_step": cpu / Double(runs)])
            }
        }
    }

    struct MixedAdapters: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "mixed-adapters",
            abstract: "Prefill one batch whose sequences each use their own LoRA adapter, against one adapter and the base.")

        @Option(help: "Model path or asset name (a Llama decoder).") var model: String = "smollm2"
        @Option(help: "Sequences (and different adapters).") var batch: Int = 8
        @Option(help: "Tokens per sequence.") var length: Int = 64
        @Option(help: "LoRA rank.") var r: Int = 16
        @Option(help: "Comma-separated target modules.") var targets: String = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        @Option(help: "Logits to compute: 'last' (each sequence's last position, what generation needs) or 'all'.")
        var logits: String = "last"
        @Option(help: "Timed runs (the median is reported).") var runs: Int = 5
        @Option(help: "Untimed warm-up runs.") var warmup: Int = 1
        @Option(help: "Threads.") var threads: Int = 2
        @Option(name: .customLong("compute-dtype"), help: "Frozen weights' products: float32, bfloat16 or auto.")
        var computeDType: ComputeDType = .float32

        func run() throws {
            try graft.run {
                Threading.setThreads(threads)
                guard logits == "last" || logits == "all" else { throw GraftError.invalid("--logits must be 'last' or 'all', got '\(logits)'") }
                guard batch >= 1, length >= 1, runs >= 1, r >= 1 else { throw GraftError.invalid("--batch, --length, --runs and --r must be ≥ 1") }
                var modelOptions = ModelOptions()
                modelOptions.task = .causalLM
                modelOptions.computeDType = computeDType
                let session = try AssetCache.openSession(model, options: modelOptions)
                let llama = try session.taskModel.decoder()
                let targetList = targets.split(separator: ",").map(String.init)
                for i in 0..<batch {
                    // init_lora_weights false draws B too, so every adapter changes the output.
                    let config: [String: Any] = ["peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targetList,
                                                 "init_lora_weights": false]
                    try session.addAdapter(name: "a\(i)", configJSON: try GraftSession.jsonString(config), seed: UInt64(100 + i))
                }
                var rng = GraftRNG(seed: 5)
                let vocab = llama.config.vocabSize
                let ids = (0..<(batch * length)).map { _ in Int32(1000 + Int(rng.next() % UInt64(max(1, vocab - 2000)))) }
                let tokens = try TokenBatch(ids: ids, batchSize: batch, length: length)
                // One adapter per sequence, in shuffled (not grouped) order.
                var perRow = (0..<batch).map(Int32.init)
                for i in stride(from: batch - 1, to: 0, by: -1) { perRow.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
                let hidden = llama.config.hiddenSize

                func prefill(_ adapterIds: [Int32]?) throws {
                    if logits == "all" {
                        _ = try session.forward(batch: tokens, adapterIds: adapterIds, output: .logits)
                        return
                    }
                    let h = try session.forward(batch: tokens, adapterIds: adapterIds, output: .hidden)
                    let last = Tensor(zeros: [batch, hidden])
                    h.withUnsafeBufferPointer { src in
                        guard let base = src.baseAddress else { return }
                        for b in 0..<batch { (last.pointer + b * hidden).update(from: base + ((b + 1) * length - 1) * hidden, count: hidden) }
                    }
                    _ = withNoGrad { llama.lmHead.forward(last) }
                }
                func time(_ label: String, _ body: () throws -> Void) throws -> Double {
                    var times: [Double] = []
                    for i in 0..<(warmup + runs) {
                        let start = DispatchTime.now().uptimeNanoseconds
                        try body()
                        let t = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                        if i >= warmup { times.append(t) }
                    }
                    times.sort()
                    let median = times[times.count / 2]
                    print(String(format: "  %@ median %.3f s (min %.3f, max %.3f)", label.padding(toLength: 40, withPad: " ", startingAt: 0),
                                 median, times.first ?? 0, times.last ?? 0))
                    return median
                }
                print("graft bench mixed-adapters: \(llama.config.layers)-layer decoder, \(batch) sequences × \(length) tokens, " +
                      "\(batch) LoRA r\(r) adapters on \(targets), logits: \(logits), threads=\(threads), \(runs) runs after \(warmup) warm-up")
                let mixed = try time("mixed (adapter ids \(perRow.map(String.init).joined(separator: ",")))") { try prefill(perRow) }
                try session.adapted.setActiveAdapter("a0")
                session.adapted.setAdaptersDisabled(false)
                let one = try time("one adapter (a0 active)") { try prefill(nil) }
                let routedOne = try time("one adapter via ids (all 0)") { try prefill([Int32](repeating: 0, count: batch)) }
                session.adapted.setAdaptersDisabled(true)
                let base = try time("base (adapters disabled)") { try prefill(nil) }
                print(String(format: "mixed / one adapter = %.3f (goal ≤ 1.05); mixed / base = %.3f; one adapter via ids / one adapter = %.3f",
                             mixed / one, mixed / base, routedOne / one))
                printBenchJSON(["workload": "mixed-adapters", "logits": logits, "median_s": mixed, "mixed_s": mixed,
                                "one_adapter_s": one, "one_adapter_via_ids_s": routedOne, "base_s": base])
            }
        }
    }
}

extension ComputeDType: ExpressibleByArgument {}

/// ", OpenBLAS <core> kernels (by CPU features)" when Graft overrode OpenBLAS's choice at load, else empty: a bench
/// figure from the SSE3 fallback is four times slower and should say which kernels ran.
var blasNote: String {
    Threading.blasCoreOverride.map { ", OpenBLAS \($0) kernels (by CPU features)" } ?? ""
}
