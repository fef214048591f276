import ArgumentParser
import Foundation
import Graft
import GraftAssets

/// The per-token dynamic-depth methods `graft depth` builds, each with its SmolLM2 test's training settings.
enum DepthMethod: String, CaseIterable {
    /// Dr.LLM: a router per layer skips it, runs it or runs it twice, per sequence.
    case drllm
    /// Mixture-of-Recursions: a shared block of layers recursed a routed number of times per token.
    case mor
    /// DyT: a dispatcher per layer sends each token through the FFN or past it, with an adapter beside it.
    case dyt
    /// Duo-LLM: a router per layer sends each token past the FFN, through a small FFN or through the dense one.
    case duo

    /// The method's name in reports and errors.
    var displayName: String {
        switch self {
        case .drllm: "Dr.LLM"
        case .mor: "Mixture-of-Recursions"
        case .dyt: "DyT"
        case .duo: "Duo-LLM"
        }
    }

    /// Training steps of the method's SmolLM2 test.
    var defaultTrainSteps: Int { self == .drllm || self == .mor ? 40 : 60 }

    /// Learning rate of the method's SmolLM2 test (Duo-LLM: its routers').
    var defaultLearningRate: Float {
        switch self {
        case .drllm: 3e-3
        case .mor: 1e-3
        case .dyt, .duo: 2e-2
        }
    }

    /// The config file a directory saved by the method's format holds.
    var configName: String {
        switch self {
        case .drllm: DrLLMFormat.configName
        case .mor: MixtureOfRecursionsFormat.configName
        case .dyt: DyTFormat.configName
        case .duo: DuoLLMFormat.configName
        }
    }
}

/// What a method measured on the held-out texts under hard (inference) routing.
struct DepthReport {
    /// Held-out perplexity.
    let perplexity: Double
    /// Column header of the compute measure (e.g. "layers/token").
    let measureName: String
    /// The dense model's value of the measure.
    let denseMeasure: Double
    /// The method's value of the measure.
    let measure: Double
    /// One line on the routes taken (per-layer actions, depth histogram, choice shares).
    let routes: String
    /// The method's JSON fields, its compute measure under a key that names it among them.
    let fields: [String: Any]
}

/// `graft depth`: builds a dynamic-depth method (Dr.LLM, Mixture-of-Recursions, DyT, Duo-LLM) on a frozen dense
/// Llama decoder, trains it on the non-held-out texts (or loads a saved one) and reports held-out perplexity under
/// hard routing against the dense model's, with the depth or compute per token the method measured.
struct Depth: ParsableCommand {
    /// The subcommand's help.
    static let configuration = CommandConfiguration(
        abstract: "Build and train a dynamic-depth method (Dr.LLM, MoR, DyT, Duo-LLM), report held-out perplexity and depth/compute per token.")

    @Option(help: "The method: drllm (skip/run/repeat each layer per sequence), mor (Mixture-of-Recursions), dyt (per-token FFN skipping with adapters), duo (Duo-LLM: skip, small or big FFN per token). Optional with --load.")
    var method: String?
    @Option(help: "Model path or asset name (a Llama decoder).") var model: String = "smollm2"
    @Option(help: "Text: 'tweets' (the tweet corpus; every 10th tweet held out) or a file with one text per line.")
    var data: String = "tweets"
    @Option(name: .customLong("train-steps"), help: "Training steps (default: drllm, mor 40; dyt, duo 60).")
    var trainSteps: Int?
    @Option(name: .customLong("batch-size"), help: "Texts per training step.") var batchSize: Int = 4
    @Option(help: "AdamW learning rate (default: drllm 3e-3, mor 1e-3, dyt 2e-2, duo 2e-2 for its routers).")
    var lr: Float?
    @Option(name: .customLong("eval-texts"), help: "Held-out texts the perplexity is measured on.") var evalTexts: Int = 200
    @Option(name: .customLong("max-length"), help: "Tokens per text at most.") var maxLength: Int = 64
    @Option(name: .customLong("calibration-tokens"), help: "Tokens of non-held-out text the training batches cycle through (and Duo-LLM ranks neurons on).")
    var calibrationTokens: Int = 8192
    @Option(help: "Seed of the new weights and the Gumbel noise.") var seed: UInt64 = 1
    @Option(help: "Threads.") var threads: Int = 2
    @Option(help: "Save the trained method here, in its format (drllm_config.json, recursion_config.json, dyt_config.json or duo_config.json).")
    var output: String?
    @Option(help: "Load a saved method instead of building one (its format is told by its config file).") var load: String?
    @Option(name: .customLong("compute-penalty"), help: "drllm, mor: weight of the expected layer runs / recursion depth in the loss (default: drllm 1.5, mor 0.3).")
    var computePenalty: Float?
    @Option(help: "drllm: width of each router's bottleneck.") var bottleneck: Int = 32
    @Option(help: "drllm: windows of the routers' mean pooling.") var windows: Int = 8
    @Option(name: .customLong("execute-bias"), help: "drllm: new routers' bias toward running each layer once.") var executeBias: Float = 2
    @Option(name: .customLong("block-start"), help: "mor: first layer of the shared block.") var blockStart: Int = 12
    @Option(name: .customLong("block-end"), help: "mor: the layer after the shared block.") var blockEnd: Int = 15
    @Option(name: .customLong("suffix-start"), help: "mor: first layer run after the recursions (larger than --block-end: the block stands in for the layers between).")
    var suffixStart: Int = 18
    @Option(name: .customLong("max-recursions"), help: "mor: most recursions of the block per token.") var maxRecursions: Int = 2
    @Option(name: .customLong("first-depth-bias"), help: "mor: new router's bias toward one recursion.") var firstDepthBias: Float = 0
    @Option(name: .customLong("target-rate"), help: "dyt: fraction of tokens running the FFN the rate loss pulls toward.")
    var targetRate: Float = 0.5
    @Option(name: .customLong("rate-weight"), help: "dyt: weight of the rate loss.") var rateWeight: Float = 10
    @Option(name: .customLong("adapter-dim"), help: "dyt: the adapters' bottleneck width.") var adapterDim: Int = 16
    @Option(name: .customLong("target-compute"), help: "duo: FFN compute per token (dense 1) the compute loss pulls toward.")
    var targetCompute: Float = 0.5
    @Option(name: .customLong("compute-weight"), help: "duo: weight of the compute loss.") var computeWeight: Float = 10
    @Option(name: .customLong("small-size"), help: "duo: neurons of each small FFN.") var smallSize: Int = 256
    @Option(name: .customLong("small-lr"), help: "duo: AdamW learning rate of the small FFNs.") var smallLr: Float = 3e-4
    @Option(name: .customLong("rank-tokens"), help: "duo: calibration tokens the small FFNs' neurons are ranked on.") var rankTokens: Int = 1024
    @Option(name: .customLong("initial-bias"), help: "dyt, duo: new dispatchers' / routers' bias toward the dense FFN.")
    var initialBias: Float = 1.5

    /// The training steps: `--train-steps` or the method's default.
    var steps: Int { trainSteps ?? chosenMethod.map(\.defaultTrainSteps) ?? 0 }
    /// The learning rate: `--lr` or the method's default.
    var learningRate: Float { lr ?? chosenMethod.map(\.defaultLearningRate) ?? 1e-3 }
    /// The compute penalty: `--compute-penalty` or the method's default.
    var penalty: Float { computePenalty ?? (chosenMethod == .mor ? 0.3 : 1.5) }
    /// `--method` as a method, nil when not given or not a method name.
    var chosenMethod: DepthMethod? { method.flatMap(DepthMethod.init(rawValue:)) }

    /// Reports the dense model, builds and trains the method (or loads it), reports it and prints the JSON line.
    func run() throws {
        try graft.run {
            try checkOptions()
            Threading.setThreads(threads)
            let path = resolveModelPath(model)
            let llama = try LlamaModel(gguf: GGUFFile(contentsOf: path))
            try checkOptions(for: llama)
            let tokenizer = try BPETokenizer(ggufFile: path)
            let texts = try loadTexts()
            let (calibration, evalExamples) = HeldOutText.split(texts, evalTexts: evalTexts, maxLength: maxLength, tokenizer: tokenizer)
            func encode(_ t: String) -> [Int32] { Array(tokenizer.encode(t).prefix(maxLength)) }
            guard !evalExamples.isEmpty else { throw GraftError.invalid("--data '\(data)': no held-out text (every 10th) has 2 tokens or more") }
            print("model      \(path) (\(llama.config.layers) layers, hidden \(llama.config.hiddenSize), FFN \(llama.config.intermediateSize))")
            print("data       \(data): \(texts.count) texts, \(evalExamples.count) held-out texts (every 10th) evaluated")
            let dense = try perplexity(llama, evalExamples)
            print(String(format: "dense      held-out perplexity %.3f", dense))
            let started = Date()
            let built: DepthMethod, trainedSteps: Int
            if let load {
                built = try loadSaved(llama, from: load)
                trainedSteps = savedTrainSteps(load, method: built)
                print("loaded     \(load) (\(built.displayName))")
            } else {
                guard let method = chosenMethod else { throw GraftError.invalid("--method is required without --load") }
                var sequences: [[Int32]] = [], tokens = 0
                for text in calibration {
                    if tokens >= calibrationTokens { break }
                    let ids = encode(text)
                    guard ids.count >= 2 else { continue }
                    sequences.append(ids)
                    tokens += ids.count
                }
                guard !sequences.isEmpty else { throw GraftError.invalid("--data '\(data)': no non-held-out text has 2 tokens or more") }
                print("train      \(sequences.count) texts (\(tokens) tokens), \(steps) steps of \(batchSize), lr \(learningRate)")
                try build(method, llama, sequences: sequences)
                print(String(format: "built      in %.1f s", Date().timeIntervalSince(started)))
                built = method
                trainedSteps = steps
            }
            let report = try measure(built, llama, evalExamples)
            print("routes     \(report.routes)")
            print(row(["method", "perplexity", report.measureName, "of dense"]))
            print(row(["dense", String(format: "%.3f", dense), String(format: "%.3f", report.denseMeasure), "100.0%"]))
            print(row([built.rawValue, String(format: "%.3f", report.perplexity), String(format: "%.3f", report.measure),
                       String(format: "%.1f%%", 100 * report.measure / max(report.denseMeasure, .leastNonzeroMagnitude))]))
            var fields = report.fields
            fields.merge(["workload": "depth", "method": built.rawValue, "dense_perplexity": dense, "perplexity": report.perplexity,
                          "train_steps": trainedSteps, "layers": llama.layers.count, "eval_texts": evalExamples.count,
                          "loaded": load != nil, "seconds": Date().timeIntervalSince(started),
                          "measure_name": report.measureName, "measure": report.measure,
                          "dense_measure": report.denseMeasure]) { _, new in new }
            printBenchJSON(fields)
        }
    }

    /// Throws naming the first option whose value is out of range (the checks that need no model).
    func checkOptions() throws {
        if let method, DepthMethod(rawValue: method) == nil {
            throw GraftError.invalid("--method '\(method)' is not one of \(DepthMethod.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if load == nil && method == nil {
            throw GraftError.invalid("--method is required without --load (one of \(DepthMethod.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        if let load {
            guard output == nil else { throw GraftError.invalid("--output saves a built method; --load '\(load)' builds none") }
            _ = try savedMethod(in: load)
        }
        func require(_ ok: Bool, _ message: @autoclosure () -> String) throws {
            if !ok { throw GraftError.invalid(message()) }
        }
        try require(steps >= 0, "--train-steps must be ≥ 0, got \(steps)")
        try require(batchSize >= 1, "--batch-size must be ≥ 1, got \(batchSize)")
        try require(learningRate > 0 && learningRate.isFinite, "--lr must be a finite number > 0, got \(learningRate)")
        try require(smallLr > 0 && smallLr.isFinite, "--small-lr must be a finite number > 0, got \(smallLr)")
        try require(evalTexts >= 1, "--eval-texts must be ≥ 1, got \(evalTexts)")
        try require(maxLength >= 2, "--max-length must be ≥ 2, got \(maxLength)")
        try require(calibrationTokens >= 1, "--calibration-tokens must be ≥ 1, got \(calibrationTokens)")
        try require(threads >= 1, "--threads must be ≥ 1, got \(threads)")
        try require(penalty >= 0 && penalty.isFinite, "--compute-penalty must be a finite number ≥ 0, got \(penalty)")
        try require(bottleneck >= 1 && bottleneck <= 65536, "--bottleneck must be in 1...65536, got \(bottleneck)")
        try require(windows >= 1 && windows <= 65536, "--windows must be in 1...65536, got \(windows)")
        try require((1...64).contains(maxRecursions), "--max-recursions must be in 1...64, got \(maxRecursions)")
        try require((0...1).contains(targetRate), "--target-rate must be in [0, 1], got \(targetRate)")
        try require((0...1).contains(targetCompute), "--target-compute must be in [0, 1], got \(targetCompute)")
        try require(rateWeight >= 0 && rateWeight.isFinite, "--rate-weight must be a finite number ≥ 0, got \(rateWeight)")
        try require(computeWeight >= 0 && computeWeight.isFinite, "--compute-weight must be a finite number ≥ 0, got \(computeWeight)")
        try require(adapterDim >= 1 && adapterDim <= 65536, "--adapter-dim must be in 1...65536, got \(adapterDim)")
        try require(rankTokens >= 1, "--rank-tokens must be ≥ 1, got \(rankTokens)")
        for (name, value) in [("--execute-bias", executeBias), ("--first-depth-bias", firstDepthBias), ("--initial-bias", initialBias)] {
            try require(value.isFinite, "\(name) must be finite, got \(value)")
        }
    }

    /// Throws naming the first option that does not fit `llama` (the MoR block, Duo-LLM's small size).
    func checkOptions(for llama: LlamaModel) throws {
        guard load == nil else { return }
        let layers = llama.layers.count, ff = llama.config.intermediateSize
        if chosenMethod == .mor, !(0 <= blockStart && blockStart < blockEnd && blockEnd <= suffixStart && suffixStart <= layers) {
            throw GraftError.invalid("--block-start \(blockStart), --block-end \(blockEnd) and --suffix-start \(suffixStart) must satisfy 0 ≤ start < end ≤ suffix ≤ \(layers) (the model's layers)")
        }
        if chosenMethod == .duo, !(1..<ff).contains(smallSize) {
            throw GraftError.invalid("--small-size must be in 1..<\(ff) (the intermediate size), got \(smallSize)")
        }
    }

    /// The method saved in `directory`, told by its config file; throws when the directory holds none, or another
    /// method than `--method`.
    func savedMethod(in directory: String) throws -> DepthMethod {
        let files = FileManager.default
        guard let saved = DepthMethod.allCases.first(where: { files.fileExists(atPath: directory + "/" + $0.configName) }) else {
            throw GraftError.invalid("--load '\(directory)' holds none of \(DepthMethod.allCases.map(\.configName).joined(separator: ", "))")
        }
        if let chosenMethod, chosenMethod != saved {
            throw GraftError.invalid("--method \(chosenMethod.rawValue) does not match --load '\(directory)', which holds \(saved.displayName) (\(saved.rawValue))")
        }
        return saved
    }

    /// Installs the method saved in `directory` on `llama` and returns it.
    func loadSaved(_ llama: LlamaModel, from directory: String) throws -> DepthMethod {
        let saved = try savedMethod(in: directory)
        switch saved {
        case .drllm: llama.depthPolicy = try DrLLMFormat.load(for: llama, from: directory)
        case .mor: llama.depthPolicy = try MixtureOfRecursionsFormat.load(for: llama, from: directory)
        case .dyt: try DyTFormat.load(into: llama, from: directory)
        case .duo: try DuoLLMFormat.load(into: llama, from: directory)
        }
        return saved
    }

    /// The `train_steps` a saved config records (0 when it records none).
    func savedTrainSteps(_ directory: String, method: DepthMethod) -> Int {
        let url = URL(fileURLWithPath: directory + "/" + method.configName)
        guard let data = try? Data(contentsOf: url), let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            return 0
        }
        return object["train_steps"] as? Int ?? 0
    }

    /// One table row (``HeldOutText/row(_:)``).
    func row(_ cells: [String]) -> String { HeldOutText.row(cells) }

    /// The texts of `--data` (``HeldOutText/load(_:)``).
    func loadTexts() throws -> [String] { try HeldOutText.load(data) }

    /// Held-out perplexity over `examples` (``HeldOutText/perplexity(_:_:)``).
    func perplexity(_ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> Double {
        try HeldOutText.perplexity(llama, examples)
    }
}
