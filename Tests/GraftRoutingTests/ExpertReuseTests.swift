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

    /// The two reuse layouts: ReXMoE's window of one layer on each side, and the cross-layer shared pool (#57).
    static let windows: [Int?] = [1, nil]

    static func options(window: Int?) -> ExpertReuseOptions {
        var options = ExpertReuseOptions()
        options.window = window
        return options
    }

    @Test(arguments: windows)
    func routerGradientsThroughReusedExpertsMatchFiniteDifferences(window: Int?) throws {
        let model = try Self.moeLlama()
        try ExpertReuse.apply(to: model, options: Self.options(window: window))
        // Window 1: the middle layer, whose pool is every layer's experts. Shared pool: layer 0, which also reads
        // layer 2's experts (beyond any window of 1) from the one copy every layer shares. Before training both are
        // the same function (the same three routers stacked over the same experts), so the block checks agree; the
        // whole-model check below is where the layouts differ.
        let block = model.moeBlocks[window == nil ? 0 : 1]
        #expect(block.experts == 12)
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
        print("Expert reuse (window \(window.map(String.init) ?? "nil"), layer \(window == nil ? 0 : 1)) finite differences: worst relative error \(result.worst), \(result.kinks) kinks skipped")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst) (\(result.kinks) kinks skipped)")
        #expect(result.kinks < 40, "\(result.kinks) entries skipped as kinks")
        #expect(block.routerWeight.grad?.scalars.contains { $0 != 0 } == true)

        // Through the whole model, every layer's router: here the layouts differ (pools of 8, 12 and 8 experts with
        // window 1; 12 in every layer, read from one shared copy, with the shared pool).
        let whole = try Self.moeLlama()
        try ExpertReuse.apply(to: whole, options: Self.options(window: window))
        _ = ExpertReuse.trainableParameters(of: whole)
        let batch = try Self.batch
        let logitProbe = Tensor.randomNormal([2, 7, 32], std: 1, rng: &rng)
        sum(mul(try whole.logits(batch), logitProbe)).backward()
        let routers: [(key: String, tensor: Tensor)] = whole.moeBlocks.enumerated().flatMap { i, b in
            [(key: "\(i).router.weight", tensor: b.routerWeight), (key: "\(i).router.bias", tensor: b.routerBias)]
        }
        let wholeResult = try finiteDifferenceCheck(routers, step: 1e-2, samples: 24, skipKinks: true) {
            try RoutingFixtures.probed(whole, batch, logitProbe)
        }
        print("Expert reuse (window \(window.map(String.init) ?? "nil")) whole-model router finite differences: worst relative error \(wholeResult.worst), \(wholeResult.kinks) kinks skipped")
        #expect(wholeResult.missing.isEmpty)
        #expect(wholeResult.worst <= 2e-2, "whole model: worst relative gradient error \(wholeResult.worst) (\(wholeResult.kinks) kinks skipped)")
        #expect(wholeResult.kinks < 40, "whole model: \(wholeResult.kinks) entries skipped as kinks")
        #expect(whole.moeBlocks.allSatisfy { $0.routerWeight.grad?.scalars.contains { $0 != 0 } == true })
    }

    @Test(arguments: windows)
    func progressiveReachTrainingLowersTheLoss(window: Int?) throws {
        let model = try Self.moeLlama()
        try ExpertReuse.apply(to: model, options: Self.options(window: window))
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
        print("Expert reuse (window \(window.map(String.init) ?? "nil")) progressive-reach training: loss \(losses[0]) → \(losses.suffix(3))")
        #expect(losses.allSatisfy { $0.isFinite })
        #expect(losses.suffix(3).reduce(0, +) / 3 < losses[0] - 0.05, "loss \(losses[0]) → \(losses.suffix(3))")
    }

    @Test(arguments: windows)
    func savedReuseRoutersLoadOntoTheBaseAndBadFilesAreNamed(window: Int?) throws {
        let model = try Self.moeLlama()
        let baseDir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-reuse-moe-\(UUID().uuidString)").path
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-reuse-\(UUID().uuidString)").path
        defer { for d in [baseDir, dir] { try? FileManager.default.removeItem(atPath: d) } }
        try MoEBaseFormat.save(model: model, to: baseDir)
        var options = Self.options(window: window)
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
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/" + ExpertReuseFormat.configName))) as? [String: Any]
        #expect((config?["window"] as? Int) == (window ?? -1), "the shared pool is stored as window -1")
        #expect(reloaded.moeBlocks.map(\.experts) == (window == nil ? [12, 12, 12] : [8, 12, 8]))
        #expect(reloaded.moeBlocks.allSatisfy { $0.combine == .probability })
        if window == nil {
            let blocks = reloaded.moeBlocks
            #expect(blocks[0].gateWeight === blocks[2].gateWeight, "the loaded shared pool is one copy")
        }
        #expect(try withNoGrad { try model.logits(try Self.batch).scalars } == withNoGrad { try reloaded.logits(try Self.batch).scalars })
        // Another window whose pools differ in size from the saved ones (on 3 layers, window 2 is the shared pool).
        let otherWindow = window == nil ? 1 : 2
        let changes: [(field: String, value: Any)] = [("window", otherWindow), ("experts_per_layer", 8), ("combine", "max"), ("window", -3)]
        let refused = try loadsWithChangedConfig(path: dir + "/" + ExpertReuseFormat.configName, changes: changes,
                                                 fresh: reloadedModel) { try ExpertReuseFormat.load(into: $0, from: dir) }
        for ((message, fresh), named) in zip(refused, ["router.weight", "experts_per_layer", "combine", "window"]) {
            #expect(message?.contains(named) == true, "\(named): \(message ?? "accepted")")
            #expect(fresh.moeBlocks.allSatisfy { $0.expertLayers == nil }, "a refused load leaves the base as it was")
        }
    }
}
