import Foundation
import Graft

/// Building, training, saving and measuring each `graft depth` method, with its SmolLM2 test's recipe.
extension Depth {
    /// Builds `method` on `llama`, trains it `steps` steps on batches of `sequences`, leaves it in hard (inference)
    /// routing and saves it to `--output`.
    func build(_ method: DepthMethod, _ llama: LlamaModel, sequences: [[Int32]]) throws {
        var extra: [String: Any] = ["base_model": model, "seed": seed, "train_steps": steps, "batch_size": batchSize,
                                    "learning_rate": decimal(learningRate), "calibration_tokens": calibrationTokens,
                                    "max_length": maxLength]
        switch method {
        case .drllm:
            let routing = try buildDrLLM(llama, sequences: sequences)
            extra["compute_penalty"] = decimal(penalty)
            if let output { try DrLLMFormat.save(routing, model: llama, to: output, extra: extra) }
        case .mor:
            let routing = try buildMixtureOfRecursions(llama, sequences: sequences)
            extra["compute_penalty"] = decimal(penalty)
            if let output { try MixtureOfRecursionsFormat.save(routing, model: llama, to: output, extra: extra) }
        case .dyt:
            try buildDyT(llama, sequences: sequences)
            extra.merge(["target_rate": decimal(targetRate), "rate_weight": decimal(rateWeight)]) { _, new in new }
            if let output { try DyTFormat.save(model: llama, to: output, extra: extra) }
        case .duo:
            try buildDuoLLM(llama, sequences: sequences)
            extra.merge(["target_compute": decimal(targetCompute), "compute_weight": decimal(computeWeight),
                         "small_learning_rate": decimal(smallLr), "rank_tokens": rankTokens]) { _, new in new }
            if let output { try DuoLLMFormat.save(model: llama, to: output, extra: extra) }
        }
        if let output { print("saved      \(output)") }
    }

    /// `value` as the Double its shortest decimal spells (0.3, not 0.30000001192092896), for saved configs.
    func decimal(_ value: Float) -> Double { Double(value.description) ?? Double(value) }

    /// The held-out report of `method` installed on `llama`, under hard routing.
    func measure(_ method: DepthMethod, _ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> DepthReport {
        switch method {
        case .drllm: try measureDrLLM(llama, examples)
        case .mor: try measureMixtureOfRecursions(llama, examples)
        case .dyt: try measureDyT(llama, examples)
        case .duo: try measureDuoLLM(llama, examples)
        }
    }

    /// `steps` steps of `optimizers` on batches of `sequences` (cycled in order) under `lossOf`, which returns the
    /// loss and the hard routes' compute measure (named `measureName`); prints progress every 10 steps and throws
    /// naming `method` and the step when the loss is not finite. The optimizers' parameters stop requiring
    /// gradients afterwards.
    func train(_ method: DepthMethod, optimizers: [AdamW], sequences: [[Int32]], measureName: String,
               loss lossOf: (TokenBatch, [Int32]) throws -> (loss: Tensor, measure: Double)) throws {
        defer { for o in optimizers { for p in o.parameters { p.requiringGrad(false) } } }
        guard steps > 0, !sequences.isEmpty else { return }
        let started = Date()
        for step in 0..<steps {
            let (batch, targets) = try HeldOutText.trainingBatch(sequences, step: step, size: batchSize)
            let (loss, measure) = try lossOf(batch, targets)
            guard loss.item.isFinite else {
                throw GraftError(.state, "\(method.displayName): the training loss is \(loss.item) at step \(step + 1) of \(steps); lower --lr")
            }
            loss.backward()
            for o in optimizers {
                o.step()
                o.zeroGrad()
            }
            if step % 10 == 0 || step == steps - 1 {
                print(String(format: "train      step %d/%d loss %.4f %@ %.3f (%.1f s)", step + 1, steps, loss.item,
                             measureName as NSString, measure, Date().timeIntervalSince(started)))
            }
        }
    }

    /// Dr.LLM routers on every layer (new ones run each layer once), trained straight-through on the LM loss plus
    /// `--compute-penalty` times the expected layer runs over the layer count.
    func buildDrLLM(_ llama: LlamaModel, sequences: [[Int32]]) throws -> DrLLMRouting {
        let routing = try DrLLMRouting(model: llama, bottleneck: bottleneck, windows: windows, executeBias: executeBias, seed: seed)
        llama.depthPolicy = routing
        print("drllm      a router per layer (bottleneck \(bottleneck), \(windows) windows), straight-through, compute penalty \(penalty)")
        routing.mode = .straightThrough
        defer { routing.mode = .hard }
        let optimizer = AdamW(parameters: routing.namedParameters().map { $0.tensor.requiringGrad() }, learningRate: learningRate, weightDecay: 0)
        try train(.drllm, optimizers: [optimizer], sequences: sequences, measureName: "layer runs") {
            let result = try routing.trainingLoss(model: llama, batch: $0, targets: $1, computePenalty: penalty)
            return (result.loss, result.meanRuns)
        }
        return routing
    }

    /// Layers run per token under the Dr.LLM routers (summed over layers; dense: the layer count).
    func measureDrLLM(_ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> DepthReport {
        guard let routing = llama.drLLMRouting else { throw GraftError(.state, "Dr.LLM: the model has no Dr.LLM routing") }
        routing.mode = .hard
        routing.resetStatistics()
        let ppl = try perplexity(llama, examples)
        let depth = routing.meanDepth, layers = Double(routing.routers.count)
        let actions = routing.statistics.map { s in
            ["S", "E", "T"].enumerated().filter { s.dispatchedTokens[$0.offset] > 0 }.map(\.element).joined()
        }
        let totals = routing.statistics.reduce([0, 0, 0]) { zip($0, $1.dispatchedTokens).map(+) }
        let share = totals.map { Double($0) / Double(max(totals.reduce(0, +), 1)) }
        return DepthReport(
            perplexity: ppl, measureName: "layers/token", denseMeasure: layers, measure: depth,
            routes: String(format: "token-layers skipped %.1f%%, run once %.1f%%, run twice %.1f%%; per layer (S skip, E execute, T twice): ",
                           100 * share[0], 100 * share[1], 100 * share[2]) + actions.joined(separator: " "),
            fields: ["mean_depth": depth, "layers_per_token": depth, "dense_layers_per_token": layers,
                     "action_fractions": ["skip": share[0], "execute": share[1], "twice": share[2]],
                     "layer_actions": actions, "bottleneck": routing.routers.first?.bottleneck ?? 0, "windows": routing.windows])
    }

    /// Mixture-of-Recursions on `--block-start`..<`--block-end` recursed up to `--max-recursions` times, then the
    /// layers from `--suffix-start`; the router trained straight-through with `--compute-penalty` on the expected depth.
    func buildMixtureOfRecursions(_ llama: LlamaModel, sequences: [[Int32]]) throws -> MixtureOfRecursions {
        let routing = try MixtureOfRecursions(model: llama, blockStart: blockStart, blockEnd: blockEnd, suffixStart: suffixStart,
                                              maxRecursions: maxRecursions, firstDepthBias: firstDepthBias, seed: seed)
        llama.depthPolicy = routing
        print("mor        layers \(blockStart)..<\(blockEnd) shared, up to \(maxRecursions) recursions, then layers \(suffixStart)..<\(llama.layers.count); compute penalty \(penalty)")
        routing.trainsRouter = true
        defer { routing.trainsRouter = false }
        let optimizer = AdamW(parameters: [routing.routerWeight.requiringGrad(), routing.routerBias.requiringGrad()],
                              learningRate: learningRate, weightDecay: 0)
        try train(.mor, optimizers: [optimizer], sequences: sequences, measureName: "depth") {
            let result = try routing.trainingLoss(model: llama, batch: $0, targets: $1, computePenalty: penalty)
            return (result.loss, result.meanDepth)
        }
        return routing
    }

    /// The mean recursion depth and the layers run per token it means.
    func measureMixtureOfRecursions(_ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> DepthReport {
        guard let routing = llama.recursionRouting else {
            throw GraftError(.state, "Mixture-of-Recursions: the model has no recursion routing")
        }
        routing.trainsRouter = false
        routing.resetStatistics()
        let ppl = try perplexity(llama, examples)
        let depth = routing.statistics.meanDepth, count = llama.layers.count
        let layers = Double(routing.layersRun(depth: 0, layerCount: count)) + depth * Double(routing.blockEnd - routing.blockStart)
        let histogram = routing.statistics.dispatchedTokens
        return DepthReport(
            perplexity: ppl, measureName: "layers/token", denseMeasure: Double(count), measure: layers,
            routes: String(format: "mean recursion depth %.3f of 1...%d; tokens per depth %@", depth, routing.maxRecursions,
                           histogram.map(String.init).joined(separator: "/") as NSString),
            fields: ["mean_depth": depth, "layers_per_token": layers, "dense_layers_per_token": Double(count),
                     "min_layers_per_token": routing.layersRun(depth: 1, layerCount: count),
                     "max_layers_per_token": routing.layersRun(depth: routing.maxRecursions, layerCount: count),
                     "depth_histogram": histogram, "block_start": routing.blockStart, "block_end": routing.blockEnd,
                     "suffix_start": routing.suffixStart, "max_recursions": routing.maxRecursions])
    }

    /// DyT dispatchers and adapters on every layer, trained straight-through toward `--target-rate` FFN runs.
    func buildDyT(_ llama: LlamaModel, sequences: [[Int32]]) throws {
        var options = DyTOptions()
        options.adapterDim = adapterDim
        options.seed = seed
        options.initialBias = initialBias
        options.targetRate = targetRate
        options.rateWeight = rateWeight
        let blocks = try DyT.apply(to: llama, options: options)
        print("dyt        \(blocks.count) layers: dispatcher + adapter (width \(adapterDim)), target FFN rate \(targetRate), rate weight \(rateWeight)")
        DyT.setMode(.straightThrough, of: llama)
        defer { DyT.setMode(.hard, of: llama) }
        let optimizer = AdamW(parameters: DyT.trainableParameters(of: llama), learningRate: learningRate, weightDecay: 0)
        try train(.dyt, optimizers: [optimizer], sequences: sequences, measureName: "FFN rate") {
            let result = try DyT.trainingLoss(model: llama, batch: $0, targets: $1, targetRate: targetRate, rateWeight: rateWeight)
            return (result.loss, result.rate)
        }
    }

    /// The FFN activation rate and the FFN + adapter FLOPs per token it means.
    func measureDyT(_ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> DepthReport {
        let blocks = DyT.blocks(of: llama)
        DyT.setMode(.hard, of: llama)
        DyT.resetStatistics(of: llama)
        let ppl = try perplexity(llama, examples)
        let rate = DyT.activationRate(of: llama), ff = llama.config.intermediateSize
        let flops = blocks.reduce(0.0) { $0 + $1.flopsPerToken(rate: $1.statistics.meanDepth, intermediate: ff) }
        let denseFlops = Double(6 * llama.config.hiddenSize * ff * blocks.count)
        return DepthReport(
            perplexity: ppl, measureName: "FFN MFLOP/tok", denseMeasure: denseFlops / 1e6, measure: flops / 1e6,
            routes: String(format: "FFN run by %.1f%% of the token-layers (%d layers; FLOPs include the adapters)", 100 * rate, blocks.count),
            fields: ["ffn_activation_rate": rate, "ffn_flops_per_token": flops, "dense_ffn_flops_per_token": denseFlops,
                     "ffn_compute_fraction": flops / max(denseFlops, 1), "dyt_layers": blocks.count,
                     "adapter_dim": blocks.first?.adapterDown.first?.shape[0] ?? 0])
    }

    /// Duo-LLM on every layer: small FFNs of `--small-size` neurons ranked on `--rank-tokens` calibration tokens,
    /// routers (`--lr`) and small FFNs (`--small-lr`) trained straight-through toward `--target-compute`.
    func buildDuoLLM(_ llama: LlamaModel, sequences: [[Int32]]) throws {
        var options = DuoLLMOptions()
        options.smallSize = smallSize
        options.initialBias = initialBias
        options.maxTokens = rankTokens
        options.seed = seed
        options.targetCompute = targetCompute
        options.computeWeight = computeWeight
        let blocks = try DuoLLM.apply(to: llama, sequences: sequences, options: options)
        print("duo        \(blocks.count) layers: skip / small FFN (\(smallSize) neurons) / dense FFN, target compute \(targetCompute), weight \(computeWeight)")
        DuoLLM.setMode(.straightThrough, of: llama)
        defer { DuoLLM.setMode(.hard, of: llama) }
        _ = DuoLLM.trainableParameters(of: llama)
        let routers = AdamW(parameters: blocks.flatMap { [$0.routerWeight, $0.routerBias] }, learningRate: learningRate, weightDecay: 0)
        let smalls = AdamW(parameters: blocks.flatMap { [$0.smallGate, $0.smallUp, $0.smallDown] }, learningRate: smallLr, weightDecay: 0)
        try train(.duo, optimizers: [routers, smalls], sequences: sequences, measureName: "compute") {
            let result = try DuoLLM.trainingLoss(model: llama, batch: $0, targets: $1, targetCompute: targetCompute,
                                                 computeWeight: computeWeight)
            return (result.loss, result.compute)
        }
    }

    /// The FFN compute per token relative to the dense FFNs and the skip / small / big shares.
    func measureDuoLLM(_ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> DepthReport {
        let blocks = DuoLLM.blocks(of: llama)
        DuoLLM.setMode(.hard, of: llama)
        DuoLLM.resetStatistics(of: llama)
        let ppl = try perplexity(llama, examples)
        let compute = DuoLLM.measuredCompute(of: llama)
        let totals = blocks.map(\.statistics.dispatchedTokens).reduce([0, 0, 0]) { zip($0, $1).map(+) }
        let share = totals.map { Double($0) / Double(max(totals.reduce(0, +), 1)) }
        return DepthReport(
            perplexity: ppl, measureName: "FFN compute", denseMeasure: 1, measure: compute,
            routes: String(format: "token-layers skipping the FFN %.1f%%, on the small FFN %.1f%%, on the dense FFN %.1f%% (%d layers)",
                           100 * share[0], 100 * share[1], 100 * share[2], blocks.count),
            fields: ["ffn_compute_fraction": compute, "choice_fractions": ["skip": share[0], "small": share[1], "big": share[2]],
                     "small_size": blocks.first?.smallGate.shape[0] ?? 0, "duo_layers": blocks.count])
    }
}
