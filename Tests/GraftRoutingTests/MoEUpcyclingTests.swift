import Foundation
import Testing
import Graft
import GraftTestSupport

/// Sparse upcycling on a tiny random Llama: exact at initialisation, gradients through the renormalized gate,
/// training with the balance loss, save/load of the trained experts.
@Suite struct MoEUpcyclingTests {
    static func options(experts: Int = 4, topK: Int = 2, layers: [Int]? = nil) -> MoEUpcyclingOptions {
        var o = MoEUpcyclingOptions()
        o.experts = experts
        o.topK = topK
        o.layers = layers
        o.routerStd = 0.5
        o.seed = 3
        return o
    }

    static func relativeError(_ a: Tensor, _ b: Tensor) -> Float { HMoETests.relativeError(a, b) }

    @Test func anUpcycledModelComputesTheDenseOneUntilTrained() throws {
        let model = try MoEficationTests.tinyLlama()
        let batch = try TokenBatch(sequences: [[1, 5, 9, 3, 7], [2, 4, 6]])
        let dense = try withNoGrad { try model.logits(batch) }
        let blocks = try MoEUpcycling.apply(to: model, options: Self.options())
        #expect(blocks.count == 2 && blocks.allSatisfy { $0.combine == .normalizedProbability && $0.expertSizes == [24, 24, 24, 24] })
        let upcycled = try withNoGrad { try model.logits(batch) }
        #expect(upcycled.scalars.allSatisfy { $0.isFinite })
        let err = Self.relativeError(upcycled, dense)
        #expect(err <= 1e-5, "upcycled logits differ from dense by \(err)")
        // Every expert is a copy of the FFN, and the router really spreads tokens (not all on one expert).
        let load = model.moeRouterStatistics[0].dispatchedTokens
        #expect(load.filter { $0 > 0 }.count >= 2, "router load \(load)")
        // Only the chosen layers are upcycled.
        try MoEUpcycling.apply(to: model, options: Self.options(layers: [1]))
        #expect(model.layers[0].feedForwardOverride == nil && model.moeBlocks.count == 1)
        for bad in [Self.options(topK: 5), Self.options(layers: [2]), Self.options(layers: [1, 1])] {
            #expect(throws: GraftError.self) { try MoEUpcycling.apply(to: try MoEficationTests.tinyLlama(), options: bad) }
        }
    }

    @Test func renormalizedGateGradientsMatchFiniteDifferences() throws {
        let model = try MoEficationTests.tinyLlama()
        let block = try #require(try MoEUpcycling.apply(to: model, options: Self.options(experts: 3, topK: 2)).first)
        // Copies give the router no gradient (the weights sum to 1 over equal outputs): make the experts differ.
        var rng = GraftRNG(seed: 17)
        for w in [block.gateWeight, block.upWeight, block.downWeight] {
            for i in 0..<w.count { w.pointer[i] += 0.2 * rng.nextNormal() }
        }
        let params = MoEUpcycling.trainableParameters(of: model)
        #expect(params.count == 2 * 5 && params.allSatisfy { $0.requiresGrad })
        let x = Tensor.randomNormal([7, 16], std: 1, rng: &rng).requiringGrad()
        let probe = Tensor.randomNormal([7, 16], std: 1, rng: &rng)
        sum(mul(block.forward(x), probe)).backward()
        let result = finiteDifferenceCheck([("x", x), ("router.weight", block.routerWeight), ("router.bias", block.routerBias),
                                            ("experts.gate_proj", block.gateWeight), ("experts.down_proj", block.downWeight)],
                                           step: 1e-2, samples: 120, skipKinks: true) {
            let y = withNoGrad { block.forward(x) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst) (\(result.kinks) kinks skipped)")
        #expect(block.routerWeight.grad?.scalars.contains { $0 != 0 } == true)
    }

    @Test func trainingLowersTheLossAndTheCopiesSpecialise() throws {
        let model = try MoEficationTests.tinyLlama()
        try MoEUpcycling.apply(to: model, options: Self.options(experts: 4, topK: 2, layers: [1]))
        let sequences = MoEficationTests.sequences(4, length: 12, seed: 7)
        let batch = try TokenBatch(sequences: sequences)
        let targets: [Int32] = sequences.flatMap { s in Array(s.dropFirst()) + [-100] }
        let optimizer = AdamW(parameters: MoEUpcycling.trainableParameters(of: model), learningRate: 1e-2, weightDecay: 0)
        var losses: [Float] = []
        for _ in 0..<30 {
            let loss = try MoEUpcycling.trainingLoss(model: model, batch: batch, targets: targets)
            losses.append(loss.item)
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
        }
        #expect(losses.allSatisfy { $0.isFinite })
        let first = try #require(losses.first), last = try #require(losses.last)
        #expect(last < 0.8 * first, "loss \(first) → \(last)")
        let block = try #require(model.moeBlocks.first)
        #expect(block.lastAuxiliaryLoss.map { $0.item.isFinite && $0.item > 0 } == true)
        // The expert copies no longer agree.
        let g = block.gateWeight, slice = g.count / 4
        #expect((0..<slice).contains { g.pointer[$0] != g.pointer[slice + $0] })
        #expect(throws: GraftError.self) { try MoEUpcycling.trainingLoss(model: model, batch: batch, targets: [1, 2]) }
    }

    @Test func trainedExpertsRoundTripThroughTheMoEBaseFormat() throws {
        let model = try MoEficationTests.tinyLlama()
        let block = try #require(try MoEUpcycling.apply(to: model, options: Self.options(layers: [1])).first)
        var rng = GraftRNG(seed: 2)
        for i in 0..<block.upWeight.count { block.upWeight.pointer[i] += 0.1 * rng.nextNormal() }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-upcycle-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try MoEBaseFormat.save(model: model, to: dir, method: .upcycling)
        let reloaded = try MoEficationTests.tinyLlama()
        try MoEBaseFormat.load(into: reloaded, from: dir)
        #expect(reloaded.layers[0].feedForwardOverride == nil && reloaded.moeBlocks.count == 1)
        let back = try #require(reloaded.moeBlocks.first)
        #expect(back.upWeight.scalars == block.upWeight.scalars && back.combine == .normalizedProbability)
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        #expect(try withNoGrad { try model.logits(batch).scalars } == withNoGrad { try reloaded.logits(batch).scalars })
        // The saved experts are required: a tensor file without them is refused, naming the tensor.
        let config = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/" + MoEBaseFormat.configName))) as? [String: Any])
        #expect(config["method"] as? String == "upcycling" && config["moe_layers"] as? [Int] == [1])
        let other = FileManager.default.temporaryDirectory.appendingPathComponent("graft-upcycle-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: other) }
        try MoEBaseFormat.save(model: model, to: other, method: .moefication)
        try FileManager.default.removeItem(atPath: other + "/" + MoEBaseFormat.configName)
        try FileManager.default.copyItem(atPath: dir + "/" + MoEBaseFormat.configName, toPath: other + "/" + MoEBaseFormat.configName)
        let error = try #require(throws: GraftError.self) { try MoEBaseFormat.load(into: try MoEficationTests.tinyLlama(), from: other) }
        #expect(error.message.contains("experts.gate_proj"), "\(error.message)")
    }
}
