import ArgumentParser
import Foundation
import Graft
import GraftAssets

/// `graft moefy`: makes an MoE base from a dense Llama decoder by MoEfication (or loads a saved one) and reports
/// held-out perplexity of the dense model against top-k routing, with the feed-forward FLOPs per token.
struct Moefy: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Split a decoder's FFNs into experts (MoEfication), fit routers, report held-out perplexity and FLOPs per k.")

    @Option(help: "Model path or asset name (a Llama decoder).") var model: String = "smollm2"
    @Option(help: "Text: 'tweets' (the tweet corpus; every 10th tweet held out) or a file with one text per line.")
    var data: String = "tweets"
    @Option(help: "Experts per layer (must divide the intermediate size).") var experts: Int = 8
    @Option(name: .customLong("top-k"), help: "Comma-separated k values to evaluate.") var topK: String = "2,4"
    @Option(name: .customLong("calibration-tokens"), help: "Tokens of non-held-out text the partition and routers are fitted on.")
    var calibrationTokens: Int = 4096
    @Option(name: .customLong("eval-texts"), help: "Held-out texts the perplexity is measured on.") var evalTexts: Int = 200
    @Option(name: .customLong("max-length"), help: "Tokens per text at most.") var maxLength: Int = 64
    @Option(help: "Seed of the clustering.") var seed: UInt64 = 0
    @Option(help: "The routers' ridge penalty, relative to the largest squared singular value of their inputs.")
    var ridge: Float = 1e-3
    @Option(help: "Save the partition and routers here (moe_config.json + moe_routers.safetensors).") var output: String?
    @Option(help: "Load a saved MoE base instead of clustering.") var load: String?
    @Option(help: "Threads.") var threads: Int = 2

    func run() throws {
        try graft.run {
            Threading.setThreads(threads)
            guard experts >= 1 else { throw GraftError.invalid("--experts must be ≥ 1, got \(experts)") }
            let ks = try topK.split(separator: ",").map { s -> Int in
                guard let k = Int(s.trimmingCharacters(in: .whitespaces)), (1...experts).contains(k) else {
                    throw GraftError.invalid("--top-k: '\(s)' is not a k in 1...\(experts)")
                }
                return k
            }
            guard !ks.isEmpty, evalTexts >= 1, maxLength >= 2 else {
                throw GraftError.invalid("--top-k needs a value; --eval-texts must be ≥ 1 and --max-length ≥ 2")
            }
            let path = resolveModelPath(model)
            let llama = try LlamaModel(gguf: GGUFFile(contentsOf: path))
            guard load != nil || llama.config.intermediateSize % experts == 0 else {
                throw GraftError.invalid("--experts \(experts) must divide the intermediate size \(llama.config.intermediateSize)")
            }
            let tokenizer = try BPETokenizer(ggufFile: path)
            let texts = try loadTexts()
            let calibration = texts.enumerated().filter { $0.offset % 10 != 9 }.map(\.element)
            let heldOut = texts.enumerated().filter { $0.offset % 10 == 9 }.map(\.element).prefix(evalTexts)
            func encode(_ t: String) -> [Int32] { Array(tokenizer.encode(t).prefix(maxLength)) }
            let evalExamples = heldOut.map(encode).filter { $0.count >= 2 }.map { ids in
                TokenizedExample(ids: ids, targets: Array(ids.dropFirst()) + [-100])
            }
            print("model      \(path) (\(llama.config.layers) layers, hidden \(llama.config.hiddenSize), FFN \(llama.config.intermediateSize))")
            print("data       \(data): \(texts.count) texts, \(evalExamples.count) held-out texts (every 10th) evaluated")
            let dense = try perplexity(llama, evalExamples)
            print(String(format: "dense      held-out perplexity %.3f", dense))
            let start = Date()
            if let load {
                try MoEBaseFormat.load(into: llama, from: load, topK: ks[0])
                print("loaded     \(load) (\(llama.moeBlocks.first?.experts ?? 0) experts per layer)")
            } else {
                var options = MoEficationOptions()
                options.experts = experts
                options.topK = ks[0]
                options.seed = seed
                options.maxTokens = calibrationTokens
                options.ridge = ridge
                let sequences = calibration.lazy.map(encode).filter { !$0.isEmpty }
                let reports = try MoEfication.apply(to: llama, sequences: Array(sequences.prefix(calibrationTokens)), options: options) {
                    print("moefy      \($0)")
                }
                let mean = reports.map(\.heldOutAgreement).reduce(0, +) / Double(max(reports.count, 1))
                let mass = reports.map(\.oracleMass).reduce(0, +) / Double(max(reports.count, 1))
                print(String(format: "routers    mean held-out top-%d agreement %.3f over %d layers (random %.3f); the true top-%d experts hold %.1f%% of the importance; built in %.1f s",
                             ks[0], mean, reports.count, Double(ks[0]) / Double(experts), ks[0], 100 * mass, Date().timeIntervalSince(start)))
                if let output {
                    try MoEBaseFormat.save(model: llama, to: output, extra: ["seed": seed, "calibration_tokens": calibrationTokens,
                                                                             "ridge": ridge, "base_model": model])
                    print("saved      \(output)")
                }
            }
            let blocks = llama.moeBlocks
            guard let first = blocks.first else { return }
            let layers = Double(blocks.count)
            let denseFlops = Double(first.flopsPerToken.dense) * layers
            print(row(["routing", "perplexity", "FFN MFLOP/tok", "FFN saved", "agreement", "entropy"]))
            print(row(["dense", String(format: "%.3f", dense), String(format: "%.2f", denseFlops / 1e6), "-", "-", "-"]))
            var rows: [[String: Any]] = []
            for k in ks {
                try llama.setMoETopK(k)
                llama.resetMoERouterStatistics()
                for b in blocks { b.checksAgreement = true }
                let ppl = try perplexity(llama, evalExamples)
                let stats = llama.moeRouterStatistics
                let agreement = stats.map(\.topKAgreement).reduce(0, +) / layers
                let entropy = stats.map(\.meanEntropy).reduce(0, +) / layers
                let routed = Double(first.flopsPerToken.routed) * layers
                print(row(["E=\(first.experts) k=\(k)", String(format: "%.3f", ppl), String(format: "%.2f", routed / 1e6),
                           String(format: "%.1f%%", 100 * (1 - routed / denseFlops)), String(format: "%.3f", agreement),
                           String(format: "%.3f", entropy)]))
                let loads = stats.map { $0.tokenFraction.max() ?? 0 }
                rows.append(["k": k, "perplexity": ppl, "ffn_flops_per_token": routed, "agreement": agreement,
                             "mean_entropy": entropy, "max_token_fraction": loads.max() ?? 0])
            }
            printBenchJSON(["workload": "moefy", "experts": first.experts, "dense_perplexity": dense,
                            "dense_ffn_flops_per_token": denseFlops, "routed": rows])
        }
    }

    /// One table row: the first column left-aligned in 10 characters, the others right-aligned in 14.
    func row(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in
            let width = i == 0 ? 10 : 14
            let pad = String(repeating: " ", count: max(0, width - c.count))
            return i == 0 ? c + pad : pad + c
        }.joined(separator: " ")
    }

    /// The texts: the tweet corpus's training split (plain text), or a file's non-empty lines.
    func loadTexts() throws -> [String] {
        if data == AssetCache.tweetsDataName {
            return try TweetCorpus.load(path: AssetCache.path(AssetCache.tweetsCSV)).train.map(\.text)
        }
        guard let text = try? String(contentsOfFile: data, encoding: .utf8) else {
            throw GraftError.io("--data: cannot read '\(data)' as UTF-8 text")
        }
        return text.split(separator: "\n").map(String.init).filter { !$0.isEmpty }
    }

    /// Perplexity of next-token prediction over `examples`, in packed batches of 32 texts.
    func perplexity(_ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> Double {
        let objective = CausalLMObjective(model: llama)
        var loss = 0.0, count = 0
        for start in stride(from: 0, to: examples.count, by: 32) {
            let batch = try PackedBatch(examples[start..<min(examples.count, start + 32)], padded: false)
            let r = try objective.evaluate(batch)
            loss += r.lossSum
            count += r.count
        }
        return count > 0 ? exp(loss / Double(count)) : .nan
    }
}
