import ArgumentParser
import Foundation
import Graft
import GraftAssets
import GraftModels
import GraftTensor

extension Bench {
    /// `graft bench decode`: prefill and greedy decoding speed of a decoder on fixed token ids, the Graft side of
    /// `bench/decode` (llama.cpp runs the same ids on the same GGUF file there).
    struct Decode: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Prefill and greedy decode speed (tokens/s) on fixed prompt token ids; used by bench/decode.")

        @Option(help: "Model path or asset name (a Llama decoder).") var model: String = "smollm2"
        @Option(name: .customLong("prompt-tokens"), help: "Prompt length in tokens (fixed ids, the same as bench/decode's llama.cpp side).")
        var promptTokens: Int = 32
        @Option(name: .customLong("new-tokens"), help: "Tokens generated greedily after the prompt (no stop token).")
        var newTokens: Int = 128
        @Option(help: """
            Rank of a LoRA on every linear layer, unmerged, each timed run paired with a base run (0: the base model \
            only).
            """)
        var r: Int = 0
        @Option(help: "Timed runs (the median of each rate is reported).") var runs: Int = 3
        @Option(help: "Untimed warm-up runs.") var warmup: Int = 1
        @Option(help: "Threads.") var threads: Int = 2
        @Flag(name: .customLong("fast-decode"), help: "Fast mode: int8 activations against the Q4_1/Q8_0 weights.")
        var fastDecode = false

        /// The prompt's token ids: a fixed, vocabulary-spread sequence both engines use.
        static func promptIDs(count: Int, vocabulary: Int) -> [Int32] {
            (0..<count).map { Int32(1000 + ($0 * 7919) % max(1, vocabulary - 2000)) }
        }

        /// One greedy generation, timed: the prefill up to the first token, then the decoding steps.
        private func timedRun(_ llama: LlamaModel, _ prompt: [Int32],
                              _ parameters: GenerationParameters) throws -> TimedRun {
            let start = DispatchTime.now().uptimeNanoseconds
            var firstToken: UInt64 = 0
            let generated = try llama.generate(prompt: prompt, parameters: parameters) { _ in
                if firstToken == 0 { firstToken = DispatchTime.now().uptimeNanoseconds }
                return true
            }
            let end = DispatchTime.now().uptimeNanoseconds
            // The first token comes out of the prefill; the rest are one decoding step each.
            let decode = generated.count > 1 ? Double(generated.count - 1) / (Double(end - firstToken) / 1e9) : nil
            return TimedRun(prefill: Double(prompt.count) / (Double(firstToken - start) / 1e9), decode: decode,
                            tokens: generated)
        }

        func run() throws {
            try graft.run {
                guard promptTokens >= 1, newTokens >= 1, runs >= 1, warmup >= 0, r >= 0 else {
                    throw GraftError.invalid("--prompt-tokens, --new-tokens and --runs must be ≥ 1, --warmup and --r ≥ 0")
                }
                Threading.setThreads(threads)
                var options = ModelOptions()
                options.task = .causalLM
                let session = try AssetCache.openSession(model, options: options)
                let llama = try session.taskModel.decoder()
                if r > 0 {
                    let config: [String: Any] = ["peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": "all-linear",
                                                 "init_lora_weights": false]
                    try session.addAdapter(name: "bench", configJSON: try GraftSession.jsonString(config), seed: 7)
                }
                let prompt = Self.promptIDs(count: promptTokens, vocabulary: llama.config.vocabSize)
                let parameters = GenerationParameters(maxNewTokens: newTokens, temperature: 0, stopTokens: [],
                                                      fastDecode: fastDecode)
                // With an adapter, each timed run is paired with a run of the base (the adapter disabled) just
                // before it, so the ratio compares runs seconds apart rather than whole invocations minutes apart.
                var rates = DecodeRates(), baseRates = DecodeRates(), tokens: [Int32] = []
                for i in 0..<(warmup + runs) {
                    if r > 0 {
                        let base = try session.adapted.withAdaptersDisabled { try timedRun(llama, prompt, parameters) }
                        if i >= warmup { baseRates.add(base) }
                    }
                    let run = try timedRun(llama, prompt, parameters)
                    guard i >= warmup else { continue }
                    tokens = run.tokens
                    rates.add(run)
                }
                let prefill = rates.medianPrefill, decode = rates.medianDecode
                var usage = rusage()
                getrusage(RUSAGE_SELF.rawValue, &usage)
                print(String(format: "graft bench decode: prompt %d tokens, %d new (greedy), %@%@, threads=%d%@: prefill %.1f tokens/s, decode %.1f tokens/s (median of %d), peak RSS %.0f MB",
                             promptTokens, newTokens, r > 0 ? "LoRA r\(r) all-linear unmerged" : "base", fastDecode ? ", fast (int8)" : "", threads, blasNote, prefill, decode,
                             runs, Double(usage.ru_maxrss) / 1024))
                var json: [String: Any] = ["workload": "decode", "fast_decode": fastDecode,
                                           "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                                           "tokens": tokens.map(Int.init)]
                if r > 0 {
                    let ratios = zip(rates.decode, baseRates.decode).map { $0 / $1 }.sorted()
                    let ratio = ratios.isEmpty ? 0 : ratios[ratios.count / 2]
                    print(String(format: "paired with the base model (adapter disabled) run before each timed run: "
                                 + "base decode %.1f tokens/s, LoRA / base %.3f (median of %d pairs)",
                                 baseRates.medianDecode, ratio, ratios.count))
                    json["base_decode_tokens_per_s"] = baseRates.medianDecode
                    json["paired_decode_ratio"] = ratio
                }
                printBenchJSON(json)
            }
        }
    }
}

/// One timed generation of `graft bench decode`.
private struct TimedRun {
    let prefill: Double
    let decode: Double?
    let tokens: [Int32]
}

/// The rates of a series of timed runs.
private struct DecodeRates {
    var prefill: [Double] = []
    var decode: [Double] = []

    mutating func add(_ run: TimedRun) {
        prefill.append(run.prefill)
        if let rate = run.decode { decode.append(rate) }
    }

    var medianPrefill: Double { Self.median(prefill) }
    var medianDecode: Double { Self.median(decode) }

    private static func median(_ values: [Double]) -> Double {
        values.isEmpty ? 0 : values.sorted()[values.count / 2]
    }
}
