import Foundation
import Graft

/// The `graft moefy` methods that restructure the decoder's feed-forward blocks rather than make a plain MoE base.
enum MoefyDesign: String, CaseIterable {
    /// WideNet: groups of consecutive layers share one router over their FFNs.
    case widenet
    /// Stratified MoE (SMoE): strata of FFN copies and new experts, a token-dependent number of passes.
    case stratified
}

extension Moefy {
    /// Throws unless the training options are usable.
    func checkTraining() throws {
        guard trainSteps >= 0, batchSize >= 1, lr > 0, lr.isFinite else {
            throw GraftError.invalid("--train-steps \(trainSteps) must be ≥ 0, --batch-size \(batchSize) ≥ 1 and --lr \(lr) > 0")
        }
    }

    /// `--train-steps` steps of `optimizer` on batches of `sequences` under `loss`, printing progress; `method`
    /// names the method when the loss is not finite.
    func train(_ llama: LlamaModel, optimizer: AdamW, sequences: [[Int32]], method: String,
               loss lossOf: (TokenBatch, [Int32]) throws -> Tensor) throws {
        guard trainSteps > 0, !sequences.isEmpty else { return }
        let started = Date()
        for step in 0..<trainSteps {
            let (batch, targets) = try HeldOutText.trainingBatch(sequences, step: step, size: batchSize)
            let loss = try lossOf(batch, targets)
            guard loss.item.isFinite else { throw GraftError(.state, "\(method): the loss is \(loss.item) at step \(step); lower --lr") }
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
            if step % 10 == 0 || step == trainSteps - 1 {
                print(String(format: "train      step %d/%d loss %.4f (%.1f s)", step + 1, trainSteps, loss.item, Date().timeIntervalSince(started)))
            }
        }
        for p in optimizer.parameters { p.requiringGrad(false) }
    }

    /// Builds `design` on `llama` from `sequences`, trains it `--train-steps` steps and saves it to `--output`.
    func build(_ design: MoefyDesign, _ llama: LlamaModel, k: Int, sequences: [[Int32]]) throws {
        try checkTraining()
        let layers = try upcycleLayers.map { try parseInts($0, option: "--upcycle-layers", range: 0...max(0, llama.layers.count - 1)) }
        let extra: [String: Any] = ["seed": seed, "calibration_tokens": calibrationTokens, "train_steps": trainSteps, "base_model": model]
        switch design {
        case .widenet:
            var options = WideNetOptions()
            options.groupSize = groupSize
            options.layers = layers
            options.topK = k
            options.maxTokens = calibrationTokens
            options.balanceLossWeight = 0.01
            let groups = try WideNet.apply(to: llama, sequences: sequences, options: options)
            print("widenet    \(groups.count) groups of \(groupSize) layers sharing one router over their FFNs, top-\(k)")
            let optimizer = AdamW(parameters: WideNet.trainableParameters(of: llama), learningRate: lr, weightDecay: 0)
            try train(llama, optimizer: optimizer, sequences: sequences, method: "widenet") {
                try llama.moeTrainingLoss(batch: $0, targets: $1)
            }
            if let output { try WideNetFormat.save(model: llama, to: output, extra: extra); print("saved      \(output)") }
        case .stratified:
            var options = StratifiedMoEOptions()
            options.strata = try parseInts(strata, option: "--strata", range: 1...64)
            options.newExpertSize = newExpertSize
            options.topK = k
            options.layers = layers
            options.seed = seed
            let blocks = try StratifiedMoE.upcycle(llama, options: options)
            print("stratified \(blocks.count) layers, strata \(options.strata.map(String.init).joined(separator: "+")) (stratum 0: FFN copies), top-\(k)")
            let optimizer = AdamW(parameters: StratifiedMoE.trainableParameters(of: llama), learningRate: lr, weightDecay: 0)
            try train(llama, optimizer: optimizer, sequences: sequences, method: "stratified") {
                try StratifiedMoE.trainingLoss(model: llama, batch: $0, targets: $1)
            }
            if let output { try StratifiedMoEFormat.save(model: llama, to: output, extra: extra); print("saved      \(output)") }
        }
    }

    /// Loads a WideNet or stratified directory into `llama`; false when `directory` holds neither.
    func loadDesign(_ llama: LlamaModel, from directory: String) throws -> Bool {
        let files = FileManager.default
        if files.fileExists(atPath: directory + "/" + WideNetFormat.configName) {
            try WideNetFormat.load(into: llama, from: directory)
            return true
        }
        if files.fileExists(atPath: directory + "/" + StratifiedMoEFormat.configName) {
            try StratifiedMoEFormat.load(into: llama, from: directory)
            return true
        }
        return false
    }

    /// Held-out perplexity of the stratified model against the dense one, with its expert passes and FFN FLOPs
    /// per token, then the JSON line.
    func reportStratified(_ llama: LlamaModel, dense: Double, evalExamples: [TokenizedExample]) throws {
        let blocks = StratifiedMoE.blocks(of: llama)
        llama.resetMoERouterStatistics()
        let ppl = try perplexity(llama, evalExamples)
        let layers = Double(max(blocks.count, 1))
        let passes = blocks.compactMap(\.meanPasses).reduce(0, +) / layers
        let flops = blocks.compactMap(\.measuredFlopsPerToken).reduce(0, +)
        let denseFlops = Double(blocks.count * 6 * llama.config.hiddenSize * llama.config.intermediateSize)
        print(row(["routing", "perplexity", "FFN MFLOP/tok", "FFN saved", "passes/token"]))
        print(row(["dense", String(format: "%.3f", dense), String(format: "%.2f", denseFlops / 1e6), "-", "-"]))
        print(row(["strata", String(format: "%.3f", ppl), String(format: "%.2f", flops / 1e6),
                   String(format: "%.1f%%", 100 * (1 - flops / max(denseFlops, 1))), String(format: "%.3f", passes)]))
        printBenchJSON(["workload": "moefy", "method": "stratified", "moe_layers": blocks.count, "strata": blocks.first?.strata ?? [],
                        "dense_perplexity": dense, "perplexity": ppl, "mean_passes": passes, "ffn_flops_per_token": flops,
                        "dense_ffn_flops_per_token": denseFlops])
    }
}
