import Foundation
import Testing
import Graft
import GraftTestSupport

/// Mixture-of-Recursions on a tiny random decoder: forced depths are plain stacks, recursion-wise KV caching gives
/// uncached runs' tokens, the gradient through the router, statistics, save/load and a short training run.
@Suite struct MixtureOfRecursionsTests {
    static func tinyLlama() throws -> LlamaModel { try tinyRandomLlama(layers: 3, std: 0.5) }
    static let ids: [Int32] = [3, 17, 9, 28, 1, 30, 12, 5, 22]

    static func logits(_ model: LlamaModel, _ ids: [Int32]) throws -> Tensor {
        try withNoGrad { try model.logits(TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
    }

    /// A routing of block [1, 2) up to 3 recursions whose router sends tokens to mixed depths.
    static func mixedRouting(_ model: LlamaModel) throws -> MixtureOfRecursions {
        let routing = try MixtureOfRecursions(model: model, blockStart: 1, blockEnd: 2, maxRecursions: 3, firstDepthBias: -0.5, seed: 4)
        for j in 0..<routing.routerWeight.count { routing.routerWeight.pointer[j] *= 20 }
        return routing
    }

    @Test func forcedDepthsAreThePlainStacksTheyStandFor() throws {
        let model = try Self.tinyLlama()
        let dense = try Self.logits(model, Self.ids)
        let routing = try MixtureOfRecursions(model: model, blockStart: 1, blockEnd: 2, maxRecursions: 2)
        model.depthPolicy = routing
        routing.forcedDepth = 1
        let once = try Self.logits(model, Self.ids)
        routing.forcedDepth = 2
        let twice = try Self.logits(model, Self.ids)
        let shared = try MixtureOfRecursions(model: model, blockStart: 0, blockEnd: 1, suffixStart: 2, maxRecursions: 2)
        shared.forcedDepth = 2
        model.depthPolicy = shared
        let sharedTwice = try Self.logits(model, Self.ids)
        model.depthPolicy = nil
        try model.replicateLayers([[0, 2], [1, 3]])
        let doubled = try Self.logits(model, Self.ids)
        try model.replicateLayers([[0, 1], [0, 1], [2, 3]])
        let replaced = try Self.logits(model, Self.ids)
        #expect(maxAbsDifference(once, dense) == 0, "depth 1 vs dense: \(maxAbsDifference(once, dense))")
        #expect(maxAbsDifference(twice, doubled) == 0, "depth 2 vs the stack 0 1 1 2: \(maxAbsDifference(twice, doubled))")
        #expect(maxAbsDifference(sharedTwice, replaced) == 0, "layer 0 shared for layer 1 vs the stack 0 0 2: \(maxAbsDifference(sharedTwice, replaced))")
        #expect(maxAbsDifference(twice, dense) > 1e-3)
    }

    @Test func recursionWiseCachingGivesTheTokensOfUncachedRuns() throws {
        let model = try Self.tinyLlama()
        let routing = try Self.mixedRouting(model)
        model.depthPolicy = routing
        let prompt: [Int32] = [3, 17, 9, 28, 1, 30]
        let cached = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 10))
        var sequence = prompt, uncached: [Int32] = []
        for _ in 0..<10 {
            let logits = try Self.logits(model, sequence)
            let v = model.config.vocabSize, last = logits.pointer + (sequence.count - 1) * v
            var best = 0
            for j in 1..<v where last[j] > last[best] { best = j }
            uncached.append(Int32(best))
            sequence.append(Int32(best))
        }
        let cache = KVCache(layerCount: 3)
        _ = try withNoGrad { try model.hiddenStates(TokenBatch(ids: sequence, batchSize: 1, length: sequence.count), cache: cache) }
        let depths = routing.lastDepths
        let slots = (0..<3).map { cache.layer(1, execution: $0).length }
        print("MoR recursion depths \(depths); block KV positions per recursion \(slots); cached \(cached), uncached \(uncached)")
        #expect(Set(depths).count >= 2, "the router did not mix depths: \(depths)")
        #expect(slots == (1...3).map { d in depths.filter { $0 >= d }.count }, "recursion caches \(slots) for depths \(depths)")
        #expect(cache.layers[0].length == sequence.count && cache.layers[2].length == sequence.count)
        #expect(cached == uncached)
        let batched = try model.generate(prompts: [prompt, [7, 7, 2]], parameters: GenerationParameters(maxNewTokens: 10))
        let alone = try model.generate(prompt: [7, 7, 2], parameters: GenerationParameters(maxNewTokens: 10))
        #expect(batched == [cached, alone], "batched generation \(batched) vs one at a time \([cached, alone])")
    }

    @Test func theGradientThroughTheRouterMatchesFiniteDifferences() throws {
        let model = try Self.tinyLlama()
        let routing = try Self.mixedRouting(model)
        try routing.addRecursionLoRA(model: model, rank: 2, alpha: 4, targets: ["o_proj", "down_proj", "q_proj"], seed: 3)
        var rng = GraftRNG(seed: 8)
        for a in routing.recursionAdapters { for b in a.loraB { for j in 0..<b.count { b.pointer[j] = 0.3 * rng.nextNormal() } } }
        model.depthPolicy = routing
        routing.gate = .probability
        routing.trainsRouter = true
        let batch = try TokenBatch(sequences: [Array(Self.ids.prefix(7)), [4, 8, 15, 16]])
        var targets = [Int32](repeating: -100, count: batch.batchSize * batch.length)
        for r in 0..<2 { for i in 0..<(batch.lengths[r] - 1) { targets[r * batch.length + i] = batch.ids[r * batch.length + i + 1] } }
        let params = routing.namedParameters().map { (key: $0.name, tensor: $0.tensor.requiringGrad()) }
        let loss = { try routing.trainingLoss(model: model, batch: batch, targets: targets, computePenalty: 0.2).loss }
        try loss().backward()
        let result = try finiteDifferenceCheck(params, step: 1e-3, samples: 16, skipKinks: true) {
            Double(try withNoGrad { try loss() }.item)
        }
        print("MoR probability-gate gradient check (router and recursion LoRAs, \(params.count) tensors): worst relative error \(result.worst), kinks \(result.kinks), missing \(result.missing), depths \(routing.lastDepths)")
        #expect(params.count == 2 + 3 * 2 * 2)
        #expect(result.missing.isEmpty)
        #expect(!result.worst.isNaN && result.worst < 2e-2, "worst relative error \(result.worst)")
        #expect(result.kinks < 8)
    }

    @Test func statisticsHoldTheDepthHistogramOfTheRoutedTokens() throws {
        let model = try Self.tinyLlama()
        let routing = try Self.mixedRouting(model)
        model.depthPolicy = routing
        _ = try withNoGrad { try model.logits(TokenBatch(sequences: [Self.ids, [4, 8, 15]])) }
        let depths = routing.lastDepths.filter { $0 > 0 }
        let stats = routing.statistics
        #expect(depths.count == 12 && stats.tokens == 12 && stats.forwardPasses == 1)
        #expect(stats.dispatchedTokens == (1...3).map { d in depths.filter { $0 == d }.count })
        let mean = Double(depths.reduce(0, +)) / 12
        #expect(abs(stats.meanDepth - mean) < 1e-12, "mean depth \(stats.meanDepth) vs \(mean)")
        #expect(stats.meanEntropy >= 0 && stats.meanEntropy <= log(3.0) + 1e-9)
        #expect(abs(stats.load.reduce(0, +) - 1) < 1e-6)
        #expect(stats.summary["depth_histogram"] as? [Int] == stats.dispatchedTokens)
        // The model's depth statistics (Dr.LLM's, DyT's and Duo-LLM's too) carry the recursion router's.
        #expect(model.depthRouterStatistics.map(\.path) == ["model.recursion.router"])
        #expect(model.depthRouterStatistics.first?.dispatchedTokens == stats.dispatchedTokens)
    }

    @Test func aSavedRoutingLoadsToTheSameDepthsAndLogits() throws {
        let model = try Self.tinyLlama()
        let routing = try Self.mixedRouting(model)
        routing.gate = .probability
        try routing.addRecursionLoRA(model: model, rank: 3, alpha: 6, seed: 1)
        var rng = GraftRNG(seed: 2)
        for a in routing.recursionAdapters { for b in a.loraB { for j in 0..<b.count { b.pointer[j] = 0.2 * rng.nextNormal() } } }
        model.depthPolicy = routing
        let before = try Self.logits(model, Self.ids)
        let depths = routing.lastDepths
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-mor-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try MixtureOfRecursionsFormat.save(routing, model: model, to: dir)
        let fresh = try Self.tinyLlama()
        let loaded = try MixtureOfRecursionsFormat.load(for: fresh, from: dir)
        fresh.depthPolicy = loaded
        let after = try Self.logits(fresh, Self.ids)
        #expect(loaded.recursionAdapters.count == 2 && loaded.recursionLoRATargets == ["o_proj", "down_proj"])
        #expect(loaded.lastDepths == depths && loaded.gate == .probability && loaded.maxRecursions == 3)
        #expect(maxAbsDifference(before, after) == 0)
        do {
            _ = try MixtureOfRecursionsFormat.load(for: try tinyRandomLlama(layers: 2, std: 0.5), from: dir)
            Issue.record("a routing for 3 layers loaded into a 2-layer model")
        } catch {
            #expect("\(error)".contains("'layers'"), "\(error)")
        }
    }

    @Test func trainingWithAComputePenaltyLowersTheDepth() throws {
        let model = try Self.tinyLlama()
        let routing = try MixtureOfRecursions(model: model, blockStart: 1, blockEnd: 2, maxRecursions: 3, firstDepthBias: -1, seed: 2)
        model.depthPolicy = routing
        routing.trainsRouter = true
        let batch = try TokenBatch(sequences: [Self.ids, [4, 8, 15, 16, 23, 12], [1, 2, 3, 4, 5, 6, 7]])
        var targets = [Int32](repeating: -100, count: batch.batchSize * batch.length)
        for r in 0..<batch.batchSize {
            for i in 0..<(batch.lengths[r] - 1) { targets[r * batch.length + i] = batch.ids[r * batch.length + i + 1] }
        }
        let optimizer = AdamW(parameters: routing.namedParameters().map { $0.tensor.requiringGrad() }, learningRate: 5e-2, weightDecay: 0)
        var first: (Float, Double)?, last: (Float, Double) = (0, 0)
        for _ in 0..<30 {
            optimizer.zeroGrad()
            let (loss, depth) = try routing.trainingLoss(model: model, batch: batch, targets: targets, computePenalty: 2)
            loss.backward()
            optimizer.step()
            if first == nil { first = (loss.item, depth) }
            last = (loss.item, depth)
        }
        print("MoR tiny training (penalty 2): objective \(first?.0 ?? .nan) → \(last.0), mean depth \(first?.1 ?? .nan) → \(last.1)")
        #expect(last.0.isFinite && last.0 < (first?.0 ?? .nan))
        #expect(last.1 < (first?.1 ?? .nan))
    }
    @Test func recursionLoRAsChangeOnlyTheLaterRecursions() throws {
        let model = try Self.tinyLlama()
        let routing = try MixtureOfRecursions(model: model, blockStart: 1, blockEnd: 2, maxRecursions: 3)
        model.depthPolicy = routing
        routing.forcedDepth = 1
        let once = try Self.logits(model, Self.ids)
        routing.forcedDepth = 3
        let thrice = try Self.logits(model, Self.ids)
        try routing.addRecursionLoRA(model: model, rank: 2, alpha: 4, seed: 5)
        let zeroB = try Self.logits(model, Self.ids)
        var rng = GraftRNG(seed: 9)
        for a in routing.recursionAdapters { for b in a.loraB { for j in 0..<b.count { b.pointer[j] = 0.3 * rng.nextNormal() } } }
        let adapted = try Self.logits(model, Self.ids)
        routing.forcedDepth = 1
        let onceAdapted = try Self.logits(model, Self.ids)
        model.depthPolicy = nil
        let plain = try Self.logits(model, Self.ids)
        #expect(maxAbsDifference(zeroB, thrice) == 0, "zero-initialised LoRAs changed depth 3 by \(maxAbsDifference(zeroB, thrice))")
        #expect(maxAbsDifference(onceAdapted, once) == 0 && maxAbsDifference(plain, once) == 0, "the LoRAs acted outside recursions 2 and 3")
        #expect(maxAbsDifference(adapted, thrice) > 1e-3, "trained LoRAs left depth 3 unchanged")
        #expect(throws: GraftError.self) { try routing.addRecursionLoRA(model: model, rank: 2, alpha: 4) }
        let other = try MixtureOfRecursions(model: model, blockStart: 1, blockEnd: 2, maxRecursions: 2)
        #expect(throws: GraftError.self) { try other.addRecursionLoRA(model: model, rank: 2, alpha: 4, targets: ["wq"]) }
    }
}
