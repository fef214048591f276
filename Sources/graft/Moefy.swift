import ArgumentParser
import Foundation
import Graft
import GraftAssets

/// `graft moefy`: makes an MoE base from a dense Llama decoder (MoEfication, HMoE's heterogeneous experts, or
/// sparse upcycling; or loads a saved one) and reports held-out perplexity of the dense model against top-k routing,
/// with the feed-forward FLOPs per token the routing measured.
struct Moefy: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make an MoE base from a dense decoder (MoEfication, HMoE, upcycling), report held-out perplexity and FLOPs per k.")

    @Option(help: "Model path or asset name (a Llama decoder).") var model: String = "smollm2"
    @Option(help: "Text: 'tweets' (the tweet corpus; every 10th tweet held out) or a file with one text per line.")
    var data: String = "tweets"
    @Option(help: "How experts are made: moefication (equal neuron clusters), hmoe (clusters of different sizes, routers tuned toward small ones), upcycling (copies of the FFN, trained), widenet (layer groups sharing one router over their FFNs), stratified (SMoE strata over FFN copies and new experts).")
    var method: String = "moefication"
    @Option(help: "Experts per layer (MoEfication: must divide the intermediate size).") var experts: Int = 8
    @Option(name: .customLong("top-k"), help: "Comma-separated k values to evaluate.") var topK: String = "2,4"
    @Option(name: .customLong("top-p"), help: "Also evaluate top-p routing at this probability (HMoE's dynamic routing).")
    var topP: Float?
    @Option(name: .customLong("calibration-tokens"), help: "Tokens of non-held-out text the partition and routers are fitted on.")
    var calibrationTokens: Int = 4096
    @Option(name: .customLong("eval-texts"), help: "Held-out texts the perplexity is measured on.") var evalTexts: Int = 200
    @Option(name: .customLong("max-length"), help: "Tokens per text at most.") var maxLength: Int = 64
    @Option(help: "Seed of the clustering and the upcycled routers.") var seed: UInt64 = 0
    @Option(help: "The routers' ridge penalty, relative to the largest squared singular value of their inputs.")
    var ridge: Float = 1e-3
    @Option(name: .customLong("expert-sizes"), help: "hmoe: comma-separated neurons per expert, summing to the intermediate size (default: geometric, see --size-ratio).")
    var expertSizes: String?
    @Option(name: .customLong("size-ratio"), help: "hmoe: largest over smallest expert for the default geometric sizes.")
    var sizeRatio: Double = 4
    @Option(name: .customLong("size-penalty"), help: "hmoe: weight of the parameter penalty in router tuning (0: importance only).")
    var sizePenalty: Float = 0.1
    @Option(name: .customLong("router-steps"), help: "hmoe: Adam steps of router tuning per layer (0: the ridge fit only).")
    var routerSteps: Int = 200
    @Option(name: .customLong("upcycle-layers"), help: "upcycling, widenet, stratified: comma-separated decoder layers to convert (default: every layer).")
    var upcycleLayers: String?
    @Option(name: .customLong("train-steps"), help: "upcycling, widenet, stratified: training steps on the calibration texts.")
    var trainSteps: Int = 50
    @Option(name: .customLong("batch-size"), help: "upcycling: texts per training step.") var batchSize: Int = 8
    @Option(help: "upcycling: AdamW learning rate.") var lr: Float = 1e-4
    @Option(name: .customLong("mup-base-width"), help: "upcycling: train under μP for MoE, --lr being tuned on a proxy of this width (router init and per-group rates scaled by it).")
    var mupBaseWidth: Int?
    @Option(name: .customLong("group-size"), help: "widenet: consecutive layers sharing one MoE block.") var groupSize: Int = 2
    @Option(help: "stratified: comma-separated experts per stratum (stratum 0: copies of the FFN).") var strata: String = "1,2"
    @Option(name: .customLong("new-expert-size"), help: "stratified: neurons of each new expert (default: a quarter of the FFN).")
    var newExpertSize: Int?
    @Option(help: "Save the MoE base here (moe_config.json + moe_routers.safetensors).") var output: String?
    @Option(help: "Load a saved MoE base instead of building one.") var load: String?
    @Option(help: "Threads.") var threads: Int = 2
    @Option(help: "Router design to put on the MoE base after it is built or loaded, trained on the calibration texts (probability combining; the design runs at the first --top-k): rmoe (GRU router across layers), rexmoe (routers also pick the experts of the layers within --window), shared (one pool of every layer's experts, a router per layer), rewire (test-time router-logit offsets adapted on each held-out text's first half, its second half scored).")
    var router: String?
    @Option(name: .customLong("design-steps"), help: "--router rmoe|rexmoe|shared: AdamW steps on the routers (default: 30 for rmoe, 24 for rexmoe and shared).")
    var designSteps: Int?
    @Option(name: .customLong("design-batch-size"), help: "--router rmoe|rexmoe|shared: calibration texts per step.") var designBatchSize: Int = 4
    @Option(name: .customLong("router-lr"), help: "--router rmoe|rexmoe|shared: AdamW learning rate.") var routerLr: Float = 3e-3
    @Option(name: .customLong("gru-size"), help: "--router rmoe: width of the GRU's input and state (initial weights drawn from --seed).")
    var gruSize: Int = 64
    @Option(help: "--router rexmoe: layers on each side whose experts a layer's router may also pick.") var window: Int = 1
    @Option(name: .customLong("open-at"), help: "--router rexmoe|shared: the step at which the reuse pool opens (progressive reach; before it each layer routes to its own experts; default: a third of the steps).")
    var openAt: Int?
    @Option(name: .customLong("rewire-steps"), help: "--router rewire: Adam steps on each context.") var rewireSteps: Int = 10
    @Option(name: .customLong("rewire-lr"), help: "--router rewire: Adam learning rate of the offsets.") var rewireLr: Float = 0.1
    @Option(name: .customLong("rewire-texts"), help: "--router rewire: the first held-out texts of 8 tokens or more rewired and scored.")
    var rewireTexts: Int = 40
    @Option(name: .customLong("router-output"), help: "Save the --router design here in its own format (rmoe_config.json, reuse_config.json, or rewiring_config.json with the last text's offsets); the MoE base goes to --output, apart.")
    var routerOutput: String?

    func run() throws {
        try graft.run {
            Threading.setThreads(threads)
            let design = MoefyDesign(rawValue: method)
            guard let method = design == nil ? MoEBaseMethod(rawValue: method) : .upcycling else {
                let names = MoEBaseMethod.allCases.map(\.rawValue) + MoefyDesign.allCases.map(\.rawValue)
                throw GraftError.invalid("--method '\(self.method)' is not one of \(names.joined(separator: ", "))")
            }
            guard experts >= 1 else { throw GraftError.invalid("--experts must be ≥ 1, got \(experts)") }
            let ks = try parseInts(topK, option: "--top-k", range: 1...experts)
            guard !ks.isEmpty, evalTexts >= 1, maxLength >= 2 else {
                throw GraftError.invalid("--top-k needs a value; --eval-texts must be ≥ 1 and --max-length ≥ 2")
            }
            if let topP, !(topP > 0 && topP <= 1) { throw GraftError.invalid("--top-p \(topP) must be in (0, 1]") }
            let path = resolveModelPath(model)
            let llama = try LlamaModel(gguf: GGUFFile(contentsOf: path))
            let ff = llama.config.intermediateSize
            guard load != nil || method != .moefication || ff % experts == 0 else {
                throw GraftError.invalid("--experts \(experts) must divide the intermediate size \(ff)")
            }
            let tokenizer = try BPETokenizer(ggufFile: path)
            let texts = try loadTexts()
            let (calibration, evalExamples) = HeldOutText.split(texts, evalTexts: evalTexts, maxLength: maxLength, tokenizer: tokenizer)
            func encode(_ t: String) -> [Int32] { Array(tokenizer.encode(t).prefix(maxLength)) }
            print("model      \(path) (\(llama.config.layers) layers, hidden \(llama.config.hiddenSize), FFN \(ff))")
            print("data       \(data): \(texts.count) texts, \(evalExamples.count) held-out texts (every 10th) evaluated")
            let dense = try perplexity(llama, evalExamples)
            print(String(format: "dense      held-out perplexity %.3f", dense))
            let start = Date()
            if let load {
                if try loadDesign(llama, from: load) {
                    print("loaded     \(load)")
                } else {
                    try MoEBaseFormat.load(into: llama, from: load, topK: ks[0])
                    print("loaded     \(load) (\(llama.moeBlocks.first?.experts ?? 0) experts per layer)")
                }
            } else if let design {
                let sequences = Array(calibration.lazy.map(encode).filter { $0.count >= 2 }.prefix(calibrationTokens))
                try build(design, llama, k: ks[0], sequences: sequences)
                print(String(format: "built      in %.1f s", Date().timeIntervalSince(start)))
            } else {
                let sequences = calibration.lazy.map(encode).filter { $0.count >= 2 }
                let calibrationSequences = Array(sequences.prefix(calibrationTokens))
                switch method {
                case .moefication, .hmoe:
                    try buildByClustering(llama, method: method, k: ks[0], sequences: calibrationSequences)
                case .upcycling:
                    try buildByUpcycling(llama, k: ks[0], sequences: calibrationSequences)
                }
                print(String(format: "built      in %.1f s", Date().timeIntervalSince(start)))
                if let output {
                    var extra: [String: Any] = ["seed": seed, "calibration_tokens": calibrationTokens, "ridge": ridge, "base_model": model]
                    if method == .upcycling {
                        extra["train_steps"] = trainSteps
                        extra["lr"] = jsonNumber(lr)
                        if let mupBaseWidth { extra["mup_base_width"] = mupBaseWidth }
                    }
                    try MoEBaseFormat.save(model: llama, to: output, method: method, extra: extra)
                    print("saved      \(output)")
                }
            }
            if router != nil { return try reportRouter(llama, k: ks[0], dense: dense, calibration: calibration, encode: encode, evalExamples: evalExamples) }
            if StratifiedMoE.blocks(of: llama).isEmpty {
                try report(llama, ks: ks, dense: dense, evalExamples: evalExamples)
            } else {
                try reportStratified(llama, dense: dense, evalExamples: evalExamples)
            }
        }
    }

    /// MoEfication (equal experts) or HMoE (sizes from `--expert-sizes` or geometric, routers then tuned with the
    /// size penalty) on every layer of `llama`.
    func buildByClustering(_ llama: LlamaModel, method: MoEBaseMethod, k: Int, sequences: [[Int32]]) throws {
        let ff = llama.config.intermediateSize
        var options = MoEficationOptions()
        options.experts = experts
        options.topK = k
        options.seed = seed
        options.maxTokens = calibrationTokens
        options.ridge = ridge
        if method == .hmoe {
            let sizes = try expertSizes.map { try parseInts($0, option: "--expert-sizes", range: 1...ff) }
                ?? HMoE.geometricSizes(experts: experts, neurons: ff, ratio: sizeRatio)
            guard sizes.count == experts, sizes.reduce(0, +) == ff else {
                throw GraftError.invalid("--expert-sizes \(sizes) must be \(experts) sizes (--experts) summing to the intermediate size \(ff)")
            }
            options.expertSizes = sizes
            print("hmoe       expert sizes \(sizes.map(String.init).joined(separator: "/"))")
        }
        let inputs = method == .hmoe && routerSteps > 0
            ? try MoEfication.collectFeedForwardInputs(model: llama, sequences: sequences, maxTokens: calibrationTokens) : []
        let reports = try MoEfication.apply(to: llama, sequences: sequences, options: options) { print("moefy      \($0)") }
        let mean = reports.map(\.heldOutAgreement).reduce(0, +) / Double(max(reports.count, 1))
        let mass = reports.map(\.oracleMass).reduce(0, +) / Double(max(reports.count, 1))
        print(String(format: "routers    mean held-out top-%d agreement %.3f over %d layers (random %.3f); the true top-%d experts hold %.1f%% of the importance",
                     k, mean, reports.count, Double(k) / Double(experts), k, 100 * mass))
        guard !inputs.isEmpty else { return }
        var tuning = HMoERouterOptions()
        tuning.steps = routerSteps
        tuning.penaltyWeight = sizePenalty
        let neurons = try HMoE.tuneRouters(model: llama, inputs: inputs, options: tuning) { print("hmoe       \($0)") }
        let before = neurons.map(\.before).reduce(0, +) / Double(neurons.count)
        let after = neurons.map(\.after).reduce(0, +) / Double(neurons.count)
        print(String(format: "hmoe       router tuning (%d steps, penalty %.3g): activated FFN neurons per token and layer %.1f → %.1f (dense %d)",
                     routerSteps, sizePenalty, before, after, ff))
    }

    /// Sparse upcycling of `--upcycle-layers`, then `--train-steps` AdamW steps of experts and routers on the
    /// calibration texts.
    func buildByUpcycling(_ llama: LlamaModel, k: Int, sequences: [[Int32]]) throws {
        var options = MoEUpcyclingOptions()
        options.experts = experts
        options.topK = k
        options.seed = seed
        options.layers = try upcycleLayers.map { try parseInts($0, option: "--upcycle-layers", range: 0...max(0, llama.layers.count - 1)) }
        try checkTraining()
        let h = llama.config.hiddenSize, ff = llama.config.intermediateSize
        let mup = try mupBaseWidth.map { try MoEMuP(baseWidth: $0, baseExpertWidth: max(1, $0 * ff / h)) }
        if let mup { options.routerStd *= Float(mup.baseWidth) / Float(h) }
        let blocks = try MoEUpcycling.apply(to: llama, options: options)
        print("upcycle    \(blocks.count) layers, \(experts) experts each (copies of the FFN), top-\(k), renormalized gate")
        if let mup {
            print(String(format: "mup        base width %d (experts %d): router std %.4g, learning-rate factors router %.4g, gate/up %.4g, down %.4g",
                         mup.baseWidth, mup.baseExpertWidth, options.routerStd,
                         mup.learningRateScale(.router, width: h, expertWidth: ff), mup.learningRateScale(.expertInput, width: h, expertWidth: ff),
                         mup.learningRateScale(.expertOutput, width: h, expertWidth: ff)))
        }
        guard trainSteps > 0, !sequences.isEmpty else { return }
        let optimizer = mup?.optimizer(for: blocks, learningRate: lr)
            ?? AdamW(parameters: MoEUpcycling.trainableParameters(of: llama), learningRate: lr, weightDecay: 0)
        try train(llama, optimizer: optimizer, sequences: sequences, method: "upcycling") {
            try MoEUpcycling.trainingLoss(model: llama, batch: $0, targets: $1)
        }
        for b in llama.moeBlocks { for t in [b.routerWeight, b.routerBias, b.gateWeight, b.upWeight, b.downWeight] { t.requiringGrad(false) } }
    }

    /// The table of held-out perplexity and measured FFN FLOPs per token for each k (and top-p), then the JSON line.
    func report(_ llama: LlamaModel, ks: [Int], dense: Double, evalExamples: [TokenizedExample]) throws {
        let blocks = llama.moeBlocks
        guard let first = blocks.first else { return }
        let layers = Double(blocks.count)
        let denseFlops = blocks.reduce(0.0) { $0 + Double($1.flopsPerToken.dense) }
        print(row(["routing", "perplexity", "FFN MFLOP/tok", "FFN saved", "agreement", "entropy"]))
        print(row(["dense", String(format: "%.3f", dense), String(format: "%.2f", denseFlops / 1e6), "-", "-", "-"]))
        var rows: [[String: Any]] = []
        let settings: [(String, Int, Float?)] = ks.map { ("E=\(first.experts) k=\($0)", $0, nil) }
            + (topP.map { [("p=\($0)", ks[0], $0)] } ?? [])
        for (label, k, p) in settings {
            try llama.setMoETopK(k)
            for b in blocks { b.topP = p }
            llama.resetMoERouterStatistics()
            for b in blocks { b.checksAgreement = true }
            let ppl = try perplexity(llama, evalExamples)
            let stats = llama.moeRouterStatistics
            let agreement = stats.map(\.topKAgreement).reduce(0, +) / layers
            let entropy = stats.map(\.meanEntropy).reduce(0, +) / layers
            let routed = blocks.reduce(0.0) { $0 + ($1.measuredFlopsPerToken ?? Double($1.flopsPerToken.routed)) }
            print(row([label, String(format: "%.3f", ppl), String(format: "%.2f", routed / 1e6),
                       String(format: "%.1f%%", 100 * (1 - routed / denseFlops)), String(format: "%.3f", agreement),
                       String(format: "%.3f", entropy)]))
            let loads = stats.map { $0.tokenFraction.max() ?? 0 }
            var entry: [String: Any] = ["k": k, "perplexity": ppl, "ffn_flops_per_token": routed, "agreement": agreement,
                                        "mean_entropy": entropy, "max_token_fraction": loads.max() ?? 0]
            if let p { entry["top_p"] = Double(p) }
            rows.append(entry)
        }
        for b in blocks { b.topP = nil }
        printBenchJSON(["workload": "moefy", "method": method, "experts": first.experts, "moe_layers": blocks.count,
                        "expert_sizes": first.expertSizes, "dense_perplexity": dense, "dense_ffn_flops_per_token": denseFlops,
                        "routed": rows])
    }

    /// Comma-separated integers of `option`, each in `range`.
    func parseInts(_ text: String, option: String, range: ClosedRange<Int>) throws -> [Int] {
        try text.split(separator: ",").map { s -> Int in
            guard let v = Int(s.trimmingCharacters(in: .whitespaces)), range.contains(v) else {
                throw GraftError.invalid("\(option): '\(s)' is not an integer in \(range.lowerBound)...\(range.upperBound)")
            }
            return v
        }
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
