import Foundation
import Testing
import Graft
import GraftTestSupport

/// Dr.LLM on a tiny random decoder: the routing invariants (forced execute is the dense model, forced skip or twice
/// is the stack without the layer or with it doubled), KV-cached generation against uncached runs under the same
/// route, the gradient through the routing, statistics, save/load and a short training run.
@Suite struct DrLLMTests {
    static func tinyLlama() throws -> LlamaModel { try tinyRandomLlama(layers: 3, std: 0.5) }

    /// Routers whose biases make layer `i` take `route[i]` by a wide margin (the MLP's terms are far smaller).
    static func routing(_ model: LlamaModel, route: [DrLLMAction]) throws -> DrLLMRouting {
        let routing = try DrLLMRouting(model: model, bottleneck: 8, windows: 2, seed: 5)
        for (router, action) in zip(routing.routers, route) {
            for j in 0..<3 { router.fc2Bias.pointer[j] = j == action.rawValue ? 40 : 0 }
        }
        return routing
    }

    static func logits(_ model: LlamaModel, _ ids: [Int32]) throws -> Tensor {
        try withNoGrad { try model.logits(TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
    }

    static let ids: [Int32] = [3, 17, 9, 28, 1, 30, 12, 5, 22]

    @Test func forcedExecuteIsTheDenseModelAndForcedSkipOrTwiceIsTheStackWithoutOrWithTheLayerDoubled() throws {
        let model = try Self.tinyLlama()
        let dense = try Self.logits(model, Self.ids)
        let routing = try DrLLMRouting(model: model, bottleneck: 8, windows: 2)
        model.depthPolicy = routing
        routing.forcedRoute = [.execute, .execute, .execute]
        let executed = try Self.logits(model, Self.ids)
        #expect(maxAbsDifference(dense, executed) == 0, "forced execute differs from dense by \(maxAbsDifference(dense, executed))")

        routing.forcedRoute = [.execute, .skip, .execute]
        let skipped = try Self.logits(model, Self.ids)
        routing.forcedRoute = [.twice, .execute, .execute]
        let doubled = try Self.logits(model, Self.ids)
        model.depthPolicy = nil
        try model.replicateLayers([[0, 1], [2, 3]])
        let removed = try Self.logits(model, Self.ids)
        try model.replicateLayers([[0, 1], [0, 3]])
        let repeated = try Self.logits(model, Self.ids)
        #expect(maxAbsDifference(skipped, removed) == 0, "skip of layer 1 vs the stack 0 2: \(maxAbsDifference(skipped, removed))")
        #expect(maxAbsDifference(doubled, repeated) == 0, "twice at layer 0 vs the stack 0 0 1 2: \(maxAbsDifference(doubled, repeated))")
        #expect(maxAbsDifference(skipped, dense) > 1e-3, "skipping a layer changed nothing")
    }

    @Test func cachedGenerationGivesTheTokensOfUncachedRunsUnderTheSameRoute() throws {
        let model = try Self.tinyLlama()
        let route: [DrLLMAction] = [.twice, .skip, .execute]
        let routing = try Self.routing(model, route: route)
        model.depthPolicy = routing
        let prompt: [Int32] = [3, 17, 9, 28, 1]
        let cached = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 10))
        routing.forcedRoute = route
        var sequence = prompt, uncached: [Int32] = []
        var worstLogit: Float = 0
        let cache = KVCache(layerCount: 3)
        routing.forcedRoute = nil
        _ = try withNoGrad { try model.hiddenStates(TokenBatch(ids: prompt, batchSize: 1, length: prompt.count), cache: cache) }
        #expect(cache.layerRoutes == route.map(\.rawValue))
        #expect(cache.layers[1].length == 0, "a skipped layer wrote \(cache.layers[1].length) positions")
        #expect(cache.layer(0, execution: 1).length == prompt.count && cache.layers[2].length == prompt.count)
        routing.forcedRoute = route
        for _ in 0..<10 {
            let logits = try Self.logits(model, sequence)
            let v = model.config.vocabSize, last = logits.pointer + (sequence.count - 1) * v
            var best = 0
            for j in 1..<v where last[j] > last[best] { best = j }
            uncached.append(Int32(best))
            sequence.append(Int32(best))
        }
        // The last step's logits with the cache, against the uncached run's last position.
        routing.forcedRoute = nil
        let replay = KVCache(layerCount: 3)
        let all = Array(sequence.dropLast())
        _ = try withNoGrad { try model.hiddenStates(TokenBatch(ids: Array(all.dropLast()), batchSize: 1, length: all.count - 1), cache: replay) }
        let step = try withNoGrad { try model.lmHead.forward(model.hiddenStates(TokenBatch(ids: [all[all.count - 1]], batchSize: 1, length: 1), cache: replay)) }
        routing.forcedRoute = route
        let full = try Self.logits(model, all)
        let v = model.config.vocabSize
        for j in 0..<v { worstLogit = worse(worstLogit, abs(step.pointer[j] - full.pointer[(all.count - 1) * v + j])) }
        print("Dr.LLM route \(route.map(\.rawValue)): cached \(cached), uncached \(uncached), last-step logit difference \(worstLogit)")
        #expect(cached == uncached)
        #expect(worstLogit < 1e-4, "cached and uncached logits differ by \(worstLogit)")
        routing.forcedRoute = nil
        let batched = try model.generate(prompts: [prompt, [7, 7, 2]], parameters: GenerationParameters(maxNewTokens: 10))
        let alone = try model.generate(prompt: [7, 7, 2], parameters: GenerationParameters(maxNewTokens: 10))
        #expect(batched == [cached, alone], "batched generation \(batched) vs one at a time \([cached, alone])")
    }

    @Test func theGradientThroughTheRoutingMatchesFiniteDifferences() throws {
        let model = try Self.tinyLlama()
        let routing = try DrLLMRouting(model: model, bottleneck: 6, windows: 2, executeBias: 0.5, seed: 3)
        for r in routing.routers {
            for t in [r.fc2Weight] { for j in 0..<t.count { t.pointer[j] *= 20 } }
        }
        model.depthPolicy = routing
        routing.mode = .soft
        let batch = try TokenBatch(sequences: [Array(Self.ids.prefix(7)), [4, 8, 15, 16]])
        var targets = [Int32](repeating: -100, count: batch.batchSize * batch.length)
        for r in 0..<2 { for i in 0..<(batch.lengths[r] - 1) { targets[r * batch.length + i] = batch.ids[r * batch.length + i + 1] } }
        let params = routing.namedParameters().map { (key: $0.name, tensor: $0.tensor.requiringGrad()) }
        let loss = { try routing.trainingLoss(model: model, batch: batch, targets: targets, computePenalty: 0.3).loss }
        try loss().backward()
        let result = try finiteDifferenceCheck(params, step: 1e-2, samples: 10) { Double(try withNoGrad { try loss() }.item) }
        print("Dr.LLM soft-routing gradient check: worst relative error \(result.worst), missing \(result.missing)")
        #expect(result.missing.isEmpty)
        #expect(!result.worst.isNaN && result.worst < 1e-2, "worst relative error \(result.worst)")

        // Straight-through: the forward pass is the hard route's exactly, and the routers get a finite gradient.
        routing.mode = .straightThrough
        for (_, t) in params { t.zeroGrad() }
        let st = try routing.trainingLoss(model: model, batch: batch, targets: targets, computePenalty: 0)
        st.loss.backward()
        let routes = routing.lastRoutes
        routing.mode = .hard
        let hard = try withNoGrad { try routing.trainingLoss(model: model, batch: batch, targets: targets, computePenalty: 0) }
        #expect(routing.lastRoutes == routes)
        #expect(st.loss.item == hard.loss.item, "straight-through forward \(st.loss.item) vs hard \(hard.loss.item)")
        let gradients = params.flatMap { $0.tensor.grad?.scalars ?? [.nan] }
        #expect(worstOf(gradients.map(abs), empty: .nan).isFinite && gradients.contains { $0 != 0 })
    }

    @Test func statisticsCountEachSequencesTokensUnderItsAction() throws {
        let model = try Self.tinyLlama()
        let routing = try Self.routing(model, route: [.skip, .twice, .execute])
        model.depthPolicy = routing
        _ = try withNoGrad { try model.logits(TokenBatch(sequences: [Array(Self.ids.prefix(5)), [4, 8, 15]])) }
        let stats = model.depthRouterStatistics
        #expect(stats.map(\.dispatchedTokens) == [[8, 0, 0], [0, 0, 8], [0, 8, 0]])
        #expect(stats.map(\.tokens) == [8, 8, 8] && stats.allSatisfy { $0.forwardPasses == 1 && $0.overflowCount == 0 })
        #expect(routing.meanDepth == 3, "mean depth \(routing.meanDepth)")
        #expect(stats.allSatisfy { $0.meanEntropy >= 0 && $0.meanEntropy < 1e-3 }, "\(stats.map(\.meanEntropy))")
        let summary = stats[1].summary
        #expect(summary["depth_histogram"] as? [Int] == [0, 0, 8] && summary["mean_depth"] as? Double == 2)
        routing.resetStatistics()
        #expect(routing.statistics.allSatisfy { $0.tokens == 0 })
    }

    @Test func savedRoutersLoadToTheSameRoutesAndLogits() throws {
        let model = try Self.tinyLlama()
        let routing = try DrLLMRouting(model: model, bottleneck: 8, windows: 3, executeBias: 0.2, seed: 9)
        for r in routing.routers { for j in 0..<r.fc2Weight.count { r.fc2Weight.pointer[j] *= 100 } }
        model.depthPolicy = routing
        let before = try Self.logits(model, Self.ids)
        let routes = routing.lastRoutes
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-drllm-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try DrLLMFormat.save(routing, model: model, to: dir)
        let loaded = try DrLLMFormat.load(for: model, from: dir)
        model.depthPolicy = loaded
        let after = try Self.logits(model, Self.ids)
        print("Dr.LLM saved route \(routes.map { $0.map(\.rawValue) })")
        #expect(loaded.lastRoutes == routes && loaded.windows == 3)
        #expect(maxAbsDifference(before, after) == 0)
        let other = try tinyRandomLlama(layers: 2, std: 0.5)
        #expect(throws: GraftError.self) { try DrLLMFormat.load(for: other, from: dir) }
        do {
            _ = try DrLLMFormat.load(for: other, from: dir)
        } catch {
            #expect("\(error)".contains("'layers'"), "\(error)")
        }
    }

    @Test func trainingWithAComputePenaltyLowersDepthAndTheObjective() throws {
        let model = try Self.tinyLlama()
        let routing = try DrLLMRouting(model: model, bottleneck: 8, windows: 2, executeBias: 1, seed: 2)
        model.depthPolicy = routing
        routing.mode = .straightThrough
        let sequences: [[Int32]] = [Self.ids, [4, 8, 15, 16, 23, 12], [1, 2, 3, 4, 5, 6, 7], [9, 9, 30, 2, 11]]
        let batch = try TokenBatch(sequences: sequences)
        var targets = [Int32](repeating: -100, count: batch.batchSize * batch.length)
        for r in 0..<batch.batchSize {
            for i in 0..<(batch.lengths[r] - 1) { targets[r * batch.length + i] = batch.ids[r * batch.length + i + 1] }
        }
        let params = routing.namedParameters().map { $0.tensor.requiringGrad() }
        let optimizer = AdamW(parameters: params, learningRate: 3e-2, weightDecay: 0)
        var first: (Float, Double)?, last: (Float, Double) = (0, 0)
        for _ in 0..<40 {
            optimizer.zeroGrad()
            let (loss, runs) = try routing.trainingLoss(model: model, batch: batch, targets: targets, computePenalty: 4)
            loss.backward()
            optimizer.step()
            if first == nil { first = (loss.item, runs) }
            last = (loss.item, runs)
        }
        print("Dr.LLM tiny training (penalty 4): objective \(first?.0 ?? .nan) → \(last.0), layer runs per sequence \(first?.1 ?? .nan) → \(last.1)")
        #expect(last.0.isFinite && last.0 < (first?.0 ?? .nan))
        #expect(last.1 < (first?.1 ?? .nan), "runs did not fall: \(first?.1 ?? .nan) → \(last.1)")
    }
    @Test func searchedRoutesScoreNoWorseThanDenseAndSupervisedRoutersLearnThem() throws {
        let model = try Self.tinyLlama()
        let routing = try DrLLMRouting(model: model, bottleneck: 8, windows: 2, executeBias: 0, seed: 6)
        model.depthPolicy = routing
        let sequences: [[Int32]] = [Self.ids, [4, 8, 15, 16, 23, 12], [1, 2, 3, 4, 5, 6, 7], [9, 9, 30, 2, 11], [20, 3, 3, 14, 6]]
        var examples: [(inputs: [Tensor], route: [DrLLMAction])] = []
        var worstGap = 0.0
        for ids in sequences {
            let found = try DrLLMRouteSearch.search(model: model, ids: ids, layerCost: 0.05)
            #expect(found.loss + 0.05 * Double(found.runs) <= found.denseLoss + 0.05 * 3 + 1e-12,
                    "searched route \(found.route) scores above dense: \(found.loss) vs \(found.denseLoss)")
            routing.forcedRoute = found.route
            let logits = try Self.logits(model, ids)
            routing.forcedRoute = nil
            routing.resetStatistics()
            let full = Double(crossEntropy(logits.reshaped([ids.count, 32]), targets: Array(ids.dropFirst()) + [-100]).item)
            worstGap = worse(worstGap, abs(full - found.loss))
            examples.append((try DrLLMRouteSearch.layerInputs(model: model, routing: routing, ids: ids, route: found.route), found.route))
        }
        #expect(worstGap < 1e-5, "search losses differ from the routed model's by \(worstGap)")
        #expect(routing.statistics.allSatisfy { $0.tokens == 0 }, "capturing inputs changed the statistics")
        let weights = DrLLMRouteSearch.classWeights(examples.map(\.route))
        let params = routing.namedParameters().map { (key: $0.name, tensor: $0.tensor.requiringGrad()) }
        let objective = { try DrLLMRouteSearch.supervisedLoss(routing: routing, examples: examples, classWeights: weights) }
        try objective().backward()
        let check = try finiteDifferenceCheck(params, step: 1e-2, samples: 6) { Double(try withNoGrad { try objective() }.item) }
        #expect(check.missing.isEmpty && !check.worst.isNaN && check.worst < 1e-2, "supervised loss gradient: \(check.worst)")
        let optimizer = AdamW(parameters: params.map(\.tensor), learningRate: 3e-2, weightDecay: 0)
        let before = try objective().item
        for _ in 0..<80 {
            optimizer.zeroGrad()
            try objective().backward()
            optimizer.step()
        }
        let after = try objective().item
        var hits = 0
        for (ids, example) in zip(sequences, examples) {
            _ = try Self.logits(model, ids)
            hits += zip(routing.lastRoutes[0], example.route).filter { $0 == $1 }.count
        }
        let accuracy = Double(hits) / Double(3 * sequences.count)
        print("Dr.LLM tiny search + supervised routers: routes \(examples.map { $0.route.map(\.rawValue) }), class weights \(weights), loss \(before) → \(after), training-route accuracy \(accuracy), FD error \(check.worst)")
        #expect(after < before && accuracy >= 0.8)
    }
    @Test func aCopiedPrefixOfAFixedCapacityCacheContinuesWithItsRouteAndRepeatedKeys() throws {
        let model = try Self.tinyLlama()
        let routing = try Self.routing(model, route: [.execute, .twice, .skip])
        model.depthPolicy = routing
        let prompt: [Int32] = [3, 17, 9, 28, 1]
        let width = model.config.kvHeads * model.config.headDim
        let original = KVCache(layerCount: 3, width: width, capacity: 16)
        _ = try withNoGrad { try model.hiddenStates(TokenBatch(ids: prompt, batchSize: 1, length: prompt.count), cache: original) }
        let copy = KVCache(layerCount: 3, width: width, capacity: 16)
        try copy.copyPrefix(of: original, positions: prompt.count)
        #expect(copy.layerRoutes == [1, 2, 0] && copy.layer(1, execution: 1).length == prompt.count && copy.layers[2].length == 0)
        // A router that would now choose otherwise does not change a continued sequence's route.
        for r in routing.routers { for j in 0..<3 { r.fc2Bias.pointer[j] = j == 1 ? 40 : 0 } }
        let step = try TokenBatch(ids: [12], batchSize: 1, length: 1)
        let a = try withNoGrad { try model.hiddenStates(step, cache: original) }
        let b = try withNoGrad { try model.hiddenStates(step, cache: copy) }
        #expect(maxAbsDifference(a, b) == 0 && original.layerRoutes == [1, 2, 0])
        routing.forcedRoute = [.execute, .twice, .skip]
        let full = try withNoGrad { try model.hiddenStates(TokenBatch(ids: prompt + [12], batchSize: 1, length: 6)) }
        let h = model.config.hiddenSize
        var worst: Float = 0
        for j in 0..<h { worst = worse(worst, abs(a.pointer[j] - full.pointer[5 * h + j])) }
        #expect(worst < 1e-4, "cached step vs uncached last position: \(worst)")
        #expect(throws: GraftError.self) { try withNoGrad { try model.hiddenStates(TokenBatch(ids: Array(repeating: 1, count: 12), batchSize: 1, length: 12), cache: copy) } }
    }
}
