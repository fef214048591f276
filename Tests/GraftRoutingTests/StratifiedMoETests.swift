import Foundation
import Testing
import Graft
import GraftTestSupport

/// Stratified MoE (SMoE, seed #61) on a tiny random Llama: the stratum walk as defined (a token moves on to the
/// stratum after its top-1 expert's, lower strata masked), the upcycled block equal to the dense FFN until trained,
/// gradients through the strata, training, statistics, save/load, cached generation and refusals.
@Suite struct StratifiedMoETests {
    /// A block of random experts over width 8: strata `strata`, expert slice 6, sizes 6 or 4 alternating.
    static func block(strata: [Int], topK: Int, seed: UInt64) throws -> StratifiedMoE {
        var rng = GraftRNG(seed: seed)
        let e = strata.reduce(0, +), h = 8, m = 6
        return try StratifiedMoE(path: "mlp", strata: strata, expertSizes: (0..<e).map { $0 % 2 == 0 ? m : 4 },
                                 gate: Tensor.randomNormal([e, m, h], std: 0.5, rng: &rng), up: Tensor.randomNormal([e, m, h], std: 0.5, rng: &rng),
                                 down: Tensor.randomNormal([e, h, m], std: 0.5, rng: &rng),
                                 routers: strata.map { _ in (Tensor.randomNormal([e, h], std: 0.5, rng: &rng), Tensor.randomNormal([e], std: 0.3, rng: &rng)) },
                                 norms: strata.dropFirst().map { _ in Tensor.randomNormal([h], std: 0.2, rng: &rng) + Tensor(repeating: 1, shape: [h]) },
                                 normEps: 1e-5, topK: topK)
    }

    /// Expert `e` of `block` alone on `x`, weighted by `w` per token.
    static func expert(_ block: StratifiedMoE, _ e: Int, _ x: Tensor, weight w: [Float]) -> [Float] {
        let rows = (0..<block.experts).map { $0 == e ? (0..<Int32(x.rows)).map { $0 } : [] }
        var weights = [Float](repeating: 0, count: x.rows * block.experts)
        for t in 0..<x.rows { weights[t * block.experts + e] = w[t] }
        return routedSwiGLUExperts(x, gate: block.gateWeight, up: block.upWeight, down: block.downWeight,
                                   weights: Tensor(shape: [x.rows, block.experts], values: weights),
                                   rows: rows, sizes: block.expertSizes).scalars
    }

    static func softmax(_ v: [Float]) -> [Float] {
        let m = v.max() ?? 0
        let e = v.map { exp($0 - m) }
        let s = e.reduce(0, +)
        return e.map { $0 / s }
    }

    @Test func tokensWalkTheStrataAsDefined() throws {
        var rng = GraftRNG(seed: 2)
        let x = Tensor.randomNormal([5, 8], std: 1, rng: &rng)
        // Strata [1, 1], top-1. Router 0 biased to stratum 1's expert: every token runs it once and leaves.
        let skip = try Self.block(strata: [1, 1], topK: 1, seed: 3)
        skip.routers[0].weight.pointer.update(repeating: 0, count: 16)
        skip.routers[0].bias.pointer.update(from: [0, 10], count: 2)
        let p1 = Self.softmax([0, 10])[1]
        let y = withNoGrad { skip.forward(x) }.scalars
        let expected = Self.expert(skip, 1, x, weight: [Float](repeating: p1, count: 5))
        #expect(zip(y, expected).allSatisfy { abs($0 - $1) <= 1e-5 }, "one pass through stratum 1's expert")
        #expect(skip.passHistogram == [5, 0] && skip.meanPasses == 1)
        // Biased to stratum 0's expert: each token runs it, then stratum 1 (its only candidate, weight 1) on the
        // stream normed by stratum 1's norm.
        let walk = try Self.block(strata: [1, 1], topK: 1, seed: 3)
        walk.routers[0].weight.pointer.update(repeating: 0, count: 16)
        walk.routers[0].bias.pointer.update(from: [10, 0], count: 2)
        let p0 = Self.softmax([10, 0])[0]
        let first = Self.expert(walk, 0, x, weight: [Float](repeating: p0, count: 5))
        let stream = Tensor(shape: [5, 8], values: zip(x.scalars, first).map { $0 + $1 })
        let normed = rmsNorm(stream, weight: walk.norms[0], eps: 1e-5)
        let second = Self.expert(walk, 1, normed, weight: [Float](repeating: 1, count: 5))
        let y2 = withNoGrad { walk.forward(x) }.scalars
        #expect(zip(y2, zip(first, second).map { $0 + $1 }).allSatisfy { abs($0 - $1) <= 1e-5 })
        #expect(walk.passHistogram == [0, 5] && walk.meanPasses == 2)
        #expect(walk.statistics[1].dispatchedTokens == [0, 5], "stratum 1's router never picks the masked expert")
    }

    @Test func gradientsThroughTheStrataMatchFiniteDifferences() throws {
        for topK in [1, 2] {
            let block = try Self.block(strata: [2, 1, 2], topK: topK, seed: 5)
            block.balanceLossWeight = topK == 2 ? 0.1 : 0
            var rng = GraftRNG(seed: 6)
            let x = Tensor.randomNormal([7, 8], std: 1, rng: &rng).requiringGrad()
            let probe = Tensor.randomNormal([7, 8], std: 1, rng: &rng)
            for p in block.parameters { p.requiringGrad() }
            var objective = sum(mul(block.forward(x), probe))
            if let aux = block.lastAuxiliaryLoss { objective = objective + aux }
            objective.backward()
            let named = [("x", x)] + block.namedParameters().map { ($0.0, $0.1) }
            let result = finiteDifferenceCheck(named, step: 1e-2, skipKinks: true) {
                let y = block.forward(x.detached())
                var v = zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
                if let aux = block.lastAuxiliaryLoss { v += Double(aux.item) }
                return v
            }
            print("stratified MoE gradients (top-\(topK)): worst relative error \(result.worst), \(result.kinks) kinks skipped, mean passes \(block.meanPasses ?? 0)")
            #expect(result.missing.isEmpty)
            #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
            #expect(result.kinks < 60)
        }
    }

    @Test func upcycledBlocksStartAsTheDenseModelTrainSaveAndLoad() throws {
        let model = try MoEficationTests.tinyLlama()
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
        let dense = try withNoGrad { try model.logits(batch) }.scalars
        var options = StratifiedMoEOptions()
        options.strata = [2, 2]
        options.newExpertSize = 8
        let blocks = try StratifiedMoE.upcycle(model, options: options)
        #expect(blocks.count == 2 && blocks[0].expertSizes == [24, 24, 8, 8])
        let start = try withNoGrad { try model.logits(batch) }.scalars
        let scale = dense.map { abs($0) }.max() ?? 1
        #expect(zip(start, dense).allSatisfy { abs($0 - $1) <= 1e-5 * scale }, "upcycled strata compute the dense FFN until trained")
        #expect(blocks.allSatisfy { $0.passHistogram == [0, 16] }, "every token runs the FFN copies, then the new stratum")
        #expect(model.moeRouterStatistics.count == 4)

        let sequences = MoEficationTests.sequences(6, length: 16, seed: 7)
        let targets: [Int32] = sequences.flatMap { Array($0.dropFirst()) + [-100] }
        let optimizer = AdamW(parameters: StratifiedMoE.trainableParameters(of: model), learningRate: 1e-2, weightDecay: 0)
        func loss() throws -> Float { try withNoGrad { try StratifiedMoE.trainingLoss(model: model, batch: TokenBatch(sequences: sequences), targets: targets).item } }
        let before = try loss()
        for _ in 0..<10 {
            try StratifiedMoE.trainingLoss(model: model, batch: TokenBatch(sequences: sequences), targets: targets).backward()
            optimizer.step()
            optimizer.zeroGrad()
        }
        for p in StratifiedMoE.trainableParameters(of: model) { p.requiringGrad(false) }
        let after = try loss()
        model.resetMoERouterStatistics()
        _ = try withNoGrad { try model.logits(batch) }
        print(String(format: "stratified MoE tiny: loss %.4f -> %.4f in 10 steps; mean passes %.2f, %.0f FLOP/token (dense FFN %d)",
                     before, after, blocks[0].meanPasses ?? 0, blocks[0].measuredFlopsPerToken ?? 0, 6 * 16 * 24))
        #expect(before.isFinite && after < before - 1e-3)
        #expect(blocks[0].statistics.allSatisfy { abs($0.load.reduce(0, +) - 1) < 1e-6 || $0.tokens == 0 })

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-smoe-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try StratifiedMoEFormat.save(model: model, to: dir)
        let fresh = try MoEficationTests.tinyLlama()
        try StratifiedMoEFormat.load(into: fresh, from: dir)
        #expect(try withNoGrad { try fresh.logits(batch) }.scalars == (try withNoGrad { try model.logits(batch) }.scalars))
        let prompt: [Int32] = [4, 8, 15]
        let out = try fresh.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
        #expect(out == (try uncachedGreedy(fresh, prompt: prompt, steps: 6)))
        let refused = try loadsWithChangedConfig(path: dir + "/" + StratifiedMoEFormat.configName,
                                                 changes: [("strata", [2, 3]), ("moe_layers", [0, 5]), ("top_k", 9), ("expert_slice", 16)],
                                                 fresh: { try MoEficationTests.tinyLlama() }) { try StratifiedMoEFormat.load(into: $0, from: dir) }
        for (message, m) in refused {
            #expect(message?.contains("stratified") == true, "\(message ?? "loaded")")
            #expect(StratifiedMoE.blocks(of: m).isEmpty, "a refused load leaves the model dense")
        }
        for (change, needle): (StratifiedMoEOptions, String) in [
            ({ var o = StratifiedMoEOptions(); o.strata = [2, 0]; return o }(), "strata"),
            ({ var o = StratifiedMoEOptions(); o.topK = 5; return o }(), "top_k 5"),
            ({ var o = StratifiedMoEOptions(); o.layers = [2]; return o }(), "2"),
        ] {
            let dense = try MoEficationTests.tinyLlama()
            let error = try #require(throws: GraftError.self) { try StratifiedMoE.upcycle(dense, options: change) }
            #expect(error.message.contains(needle), "\(error.message)")
            #expect(StratifiedMoE.blocks(of: dense).isEmpty)
        }
    }
}
