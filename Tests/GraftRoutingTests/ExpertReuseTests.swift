import Foundation
import Testing
import Graft
import GraftTestSupport

/// Experts reused across layers (ReXMoE, cross-layer shared experts) on a tiny MoE-fied Llama: the pools, the
/// progressive reach, router gradients, training and save/load.
@Suite struct ExpertReuseTests {
    /// A 3-layer tiny Llama MoE-fied into 4 experts of 6 neurons, top-2, probability combining.
    static func moeLlama() throws -> LlamaModel {
        let model = try tinyRandomLlama(layers: 3, seed: 21, std: 0.5)
        try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1),
                              options: MoEficationTests.options(experts: 4, topK: 2))
        for b in model.moeBlocks { b.combine = .probability }
        return model
    }

    static var batch: TokenBatch { get throws { try TokenBatch(sequences: [[1, 5, 9, 3, 7, 11, 2], [2, 4, 6, 8]]) } }

    @Test func poolsFollowTheWindowAndReachZeroIsTheMoEBase() throws {
        let model = try Self.moeLlama()
        let base = try withNoGrad { try model.logits(try Self.batch) }
        let sources = try ExpertReuse.apply(to: model, options: ExpertReuseOptions())
        #expect(sources == [[0, 1], [0, 1, 2], [1, 2]])
        let blocks = model.moeBlocks
        #expect(blocks.map(\.experts) == [8, 12, 8] && blocks[1].expertLayers == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
        ExpertReuse.setReach(0, of: model)
        let reachZero = try withNoGrad { try model.logits(try Self.batch) }
        let err = HMoETests.relativeError(reachZero, base)
        #expect(err <= 1e-5, "reach 0 differs from the MoE base by \(err)")
        model.resetMoERouterStatistics()
        ExpertReuse.setReach(nil, of: model)
        let pooled = try withNoGrad { try model.logits(try Self.batch) }
        #expect(pooled.scalars.allSatisfy { $0.isFinite })
        #expect(ExpertReuse.borrowedShare(of: model) > 0, "with the full pool some tokens take borrowed experts")
        // Applying twice, or saving the reusing blocks as an MoE base, is refused.
        #expect(throws: GraftError.self) { try ExpertReuse.apply(to: model, options: ExpertReuseOptions()) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-reuse-base-\(UUID().uuidString)").path
        #expect(throws: GraftError.self) { try MoEBaseFormat.save(model: model, to: dir) }
        #expect(throws: GraftError.self) { try ExpertReuse.apply(to: try tinyRandomLlama(layers: 2, std: 0.5), options: ExpertReuseOptions()) }
    }

    @Test func theSharedPoolIsOneCopyReadByEveryLayer() throws {
        let model = try Self.moeLlama()
        var options = ExpertReuseOptions()
        options.window = nil
        let sources = try ExpertReuse.apply(to: model, options: options)
        #expect(sources.allSatisfy { $0 == [0, 1, 2] })
        let blocks = model.moeBlocks
        #expect(blocks[0].gateWeight === blocks[2].gateWeight && blocks[0].downWeight === blocks[1].downWeight)
        #expect(blocks[0].routerWeight !== blocks[1].routerWeight, "each layer keeps its own router")
    }

    @Test func routerGradientsThroughReusedExpertsMatchFiniteDifferences() throws {
        let model = try Self.moeLlama()
        try ExpertReuse.apply(to: model, options: ExpertReuseOptions())
        let block = model.moeBlocks[1]
        let params = ExpertReuse.trainableParameters(of: model)
        #expect(params.count == 6)
        var rng = GraftRNG(seed: 4)
        let x = Tensor.randomNormal([7, 16], std: 1, rng: &rng).requiringGrad()
        let probe = Tensor.randomNormal([7, 16], std: 1, rng: &rng)
        sum(mul(block.forward(x), probe)).backward()
        let result = finiteDifferenceCheck([("x", x), ("router.weight", block.routerWeight), ("router.bias", block.routerBias)],
                                           step: 1e-2, skipKinks: true) {
            let y = withNoGrad { block.forward(x) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst) (\(result.kinks) kinks skipped)")
        #expect(result.kinks < 40, "\(result.kinks) entries skipped as kinks")
        #expect(block.routerWeight.grad?.scalars.contains { $0 != 0 } == true)
    }

    @Test func progressiveReachTrainingLowersTheLoss() throws {
        let model = try Self.moeLlama()
        try ExpertReuse.apply(to: model, options: ExpertReuseOptions())
        let sequences = MoEficationTests.sequences(4, length: 12, seed: 7)
        let batch = try TokenBatch(sequences: sequences)
        let targets: [Int32] = sequences.flatMap { s in Array(s.dropFirst()) + [-100] }
        let optimizer = AdamW(parameters: ExpertReuse.trainableParameters(of: model), learningRate: 3e-2, weightDecay: 0)
        var losses: [Float] = []
        for step in 0..<30 {
            ExpertReuse.setReach(step < 10 ? 0 : nil, of: model)
            let loss = try model.moeTrainingLoss(batch: batch, targets: targets)
            losses.append(loss.item)
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
        }
        #expect(losses.allSatisfy { $0.isFinite })
        #expect(losses.suffix(3).reduce(0, +) / 3 < losses[0] - 0.05, "loss \(losses[0]) → \(losses.suffix(3))")
    }

    @Test func savedReuseRoutersLoadOntoTheBaseAndBadFilesAreNamed() throws {
        let model = try Self.moeLlama()
        let baseDir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-reuse-moe-\(UUID().uuidString)").path
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-reuse-\(UUID().uuidString)").path
        defer { for d in [baseDir, dir] { try? FileManager.default.removeItem(atPath: d) } }
        try MoEBaseFormat.save(model: model, to: baseDir)
        var options = ExpertReuseOptions()
        options.borrowedBias = -1
        try ExpertReuse.apply(to: model, options: options)
        var rng = GraftRNG(seed: 2)
        for b in model.moeBlocks { for i in 0..<b.routerWeight.count { b.routerWeight.pointer[i] += 0.1 * rng.nextNormal() } }
        try ExpertReuseFormat.save(model: model, options: options, to: dir)
        func reloadedModel() throws -> LlamaModel {
            let m = try tinyRandomLlama(layers: 3, seed: 21, std: 0.5)
            try MoEBaseFormat.load(into: m, from: baseDir)
            return m
        }
        let reloaded = try reloadedModel()
        try ExpertReuseFormat.load(into: reloaded, from: dir)
        #expect(reloaded.moeBlocks.map(\.experts) == [8, 12, 8] && reloaded.moeBlocks.allSatisfy { $0.combine == .probability })
        #expect(try withNoGrad { try model.logits(try Self.batch).scalars } == withNoGrad { try reloaded.logits(try Self.batch).scalars })
        let changes: [(field: String, value: Any)] = [("window", 2), ("experts_per_layer", 8), ("combine", "max"), ("window", -3)]
        let refused = try loadsWithChangedConfig(path: dir + "/" + ExpertReuseFormat.configName, changes: changes,
                                                 fresh: reloadedModel) { try ExpertReuseFormat.load(into: $0, from: dir) }
        for ((message, fresh), named) in zip(refused, ["router.weight", "experts_per_layer", "combine", "window"]) {
            #expect(message?.contains(named) == true, "\(named): \(message ?? "accepted")")
            #expect(fresh.moeBlocks.allSatisfy { $0.expertLayers == nil }, "a refused load leaves the base as it was")
        }
    }
}
