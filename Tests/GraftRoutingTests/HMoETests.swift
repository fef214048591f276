import Foundation
import Testing
import Graft
import GraftTestSupport

/// HMoE on a tiny random Llama: heterogeneous routed experts (exactness, gradients, padding), the size penalty,
/// router tuning toward small experts, and the version-2 MoE base format.
@Suite struct HMoETests {
    static let sizes = [3, 5, 7, 9]

    static func options(topK: Int) -> MoEficationOptions {
        var o = MoEficationTests.options(experts: 4, topK: topK)
        o.expertSizes = sizes
        return o
    }

    static func relativeError(_ a: Tensor, _ b: Tensor) -> Float {
        let scale = max(worstOf(b.scalars.map(abs), empty: 0), 1e-6)
        return worstOf(zip(a.scalars, b.scalars).map { abs($0 - $1) / scale }, empty: .nan)
    }

    @Test func heterogeneousExpertsEqualZeroPaddedOnesAndTheirGradientsMatchFiniteDifferences() throws {
        var rng = GraftRNG(seed: 31)
        let t = 6, h = 5, m = 4, e = 3, sizes = [2, 4, 3]
        let x = Tensor.randomNormal([t, h], std: 1, rng: &rng).requiringGrad()
        let gate = Tensor.randomNormal([e, m, h], std: 0.5, rng: &rng).requiringGrad()
        let up = Tensor.randomNormal([e, m, h], std: 0.5, rng: &rng).requiringGrad()
        let down = Tensor.randomNormal([e, h, m], std: 0.5, rng: &rng).requiringGrad()
        let weights = Tensor.randomNormal([t, e], std: 1, rng: &rng).requiringGrad()
        let rows: [[Int32]?] = [[0, 2, 3, 5], nil, [1, 4]]
        // The reference: equal experts whose padding neurons are zero (silu(0)·0 adds nothing).
        let (pg, pu, pd) = (Tensor(shape: gate.shape, values: gate.scalars), Tensor(shape: up.shape, values: up.scalars),
                            Tensor(shape: down.shape, values: down.scalars))
        for ex in 0..<e {
            for i in sizes[ex]..<m {
                for j in 0..<h {
                    pg.pointer[(ex * m + i) * h + j] = 0
                    pu.pointer[(ex * m + i) * h + j] = 0
                    pd.pointer[(ex * h + j) * m + i] = 0
                }
            }
        }
        let padded = withNoGrad { routedSwiGLUExperts(x, gate: pg, up: pu, down: pd, weights: weights, rows: rows) }
        let probe = Tensor.randomNormal([t, h], std: 1, rng: &rng)
        let y = routedSwiGLUExperts(x, gate: gate, up: up, down: down, weights: weights, rows: rows, sizes: sizes)
        #expect(y.scalars.allSatisfy { $0.isFinite })
        let err = Self.relativeError(y, padded)
        #expect(err <= 1e-5, "heterogeneous experts differ from zero-padded ones by \(err)")
        sum(mul(y, probe)).backward()
        let result = finiteDifferenceCheck([("x", x), ("gate", gate), ("up", up), ("down", down), ("weights", weights)],
                                           step: 1e-2) {
            let y = withNoGrad { routedSwiGLUExperts(x, gate: gate, up: up, down: down, weights: weights, rows: rows, sizes: sizes) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        // Padding is never read, so it gets exactly zero gradient.
        let gg = try #require(gate.grad), gd = try #require(down.grad)
        for ex in 0..<e {
            for i in sizes[ex]..<m {
                for j in 0..<h {
                    #expect(gg.pointer[(ex * m + i) * h + j] == 0 && gd.pointer[(ex * h + j) * m + i] == 0)
                }
            }
        }
    }

    @Test func heterogeneousMoEficationAtKEqualsEIsTheDenseBlock() throws {
        let model = try MoEficationTests.tinyLlama()
        try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1), options: Self.options(topK: 4))
        var rng = GraftRNG(seed: 9)
        let x = Tensor.randomNormal([3, 5, 16], std: 1, rng: &rng)
        for (i, layer) in model.layers.enumerated() {
            let block = try #require(layer.feedForwardOverride as? MoEFeedForward)
            #expect(block.isHeterogeneous && block.expertSizes == Self.sizes && block.expertSize == 9)
            #expect(block.partition.count == 24 && Set(block.partition).count == 24)
            #expect(block.flopsPerToken.dense == 6 * 16 * 24)
            let dense = withNoGrad { layer.downProj.forward(swiglu(layer.gateProj.forward(x), layer.upProj.forward(x))) }
            let routed = withNoGrad { block.forward(x) }
            let err = Self.relativeError(routed, dense)
            #expect(err <= 1e-5, "layer \(i): k = E differs from dense by \(err)")
            // Measured FLOPs at k = E: router plus every neuron once.
            let flops = try #require(block.measuredFlopsPerToken)
            #expect(abs(flops - Double(2 * 16 * 4 + 6 * 16 * 24)) < 1e-6)
        }
        // Sizes that do not sum to the intermediate size are refused, naming them.
        var bad = Self.options(topK: 2)
        bad.expertSizes = [3, 5, 7, 8]
        let error = try #require(throws: GraftError.self) {
            try MoEfication.apply(to: try MoEficationTests.tinyLlama(), sequences: MoEficationTests.sequences(4, length: 20, seed: 1), options: bad)
        }
        #expect(error.message.contains("[3, 5, 7, 8]"))
    }

    @Test func sizePenaltyWeighsSelectionsBySizeAndItsGradientMatchesFiniteDifferences() throws {
        // Uniform routing over equal experts gives 1; size weighting moves it by each expert's size over the mean.
        let uniform = Tensor(shape: [4, 2], values: [Float](repeating: 0.5, count: 8))
        let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: uniform.pointer, count: 8), tokens: 4, experts: 2,
                                  mode: .topK, topK: 1, topP: 1, capacityFactor: nil)
        #expect(abs(HMoE.sizePenalty(probs: uniform, plan: plan, sizes: [8, 8]).item - 1) < 1e-6)
        var rng = GraftRNG(seed: 5)
        let logits = Tensor.randomNormal([6, 3], std: 1, rng: &rng).requiringGrad()
        let sizes = [2, 4, 6]
        let probs = softmax(logits)
        let fixed = RoutePlan.make(probs: UnsafeBufferPointer(start: probs.pointer, count: probs.count), tokens: 6, experts: 3,
                                   mode: .topK, topK: 1, topP: 1, capacityFactor: nil)
        let penalty = HMoE.sizePenalty(probs: probs, plan: fixed, sizes: sizes)
        // By hand: E · Σₑ fₑ (sₑ / 4) Pₑ.
        var f = [Double](repeating: 0, count: 3), p = [Double](repeating: 0, count: 3)
        for i in 0..<18 { f[i % 3] += Double(fixed.selected[i]) / 6; p[i % 3] += Double(probs.scalars[i]) / 6 }
        let expected = 3 * (0..<3).reduce(0.0) { $0 + f[$1] * Double(sizes[$1]) / 4 * p[$1] }
        #expect(abs(Double(penalty.item) - expected) < 1e-5 * max(1, expected), "penalty \(penalty.item), by hand \(expected)")
        penalty.backward()
        let result = finiteDifferenceCheck([("logits", logits)], step: 1e-3) {
            Double(withNoGrad { HMoE.sizePenalty(probs: softmax(logits), plan: fixed, sizes: sizes).item })
        }
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 1e-2, "worst relative gradient error \(result.worst)")
    }

    @Test func geometricSizesSpanTheNeuronsInMultiples() throws {
        let sizes = try HMoE.geometricSizes(experts: 4, neurons: 1536, ratio: 4)
        #expect(sizes.count == 4 && sizes.reduce(0, +) == 1536)
        #expect(zip(sizes, sizes.dropFirst()).allSatisfy { $0 < $1 }, "\(sizes)")
        #expect(sizes.dropLast().allSatisfy { $0 % 16 == 0 })
        #expect(try HMoE.geometricSizes(experts: 3, neurons: 48, ratio: 1) == [16, 16, 16])
        #expect(throws: GraftError.self) { try HMoE.geometricSizes(experts: 4, neurons: 32, ratio: 2) }
        #expect(throws: GraftError.self) { try HMoE.geometricSizes(experts: 4, neurons: 1536, ratio: 0.5) }
    }

    @Test func routerTuningWithThePenaltyMovesTokensToSmallerExperts() throws {
        let model = try MoEficationTests.tinyLlama()
        let sequences = MoEficationTests.sequences(12, length: 20, seed: 1)
        let inputs = try MoEfication.collectFeedForwardInputs(model: model, sequences: sequences, maxTokens: 200)
        try MoEfication.apply(to: model, sequences: sequences, options: Self.options(topK: 1))
        var options = HMoERouterOptions()
        options.steps = 60
        options.learningRate = 5e-2
        options.penaltyWeight = 2
        let report = try HMoE.tuneRouters(model: model, inputs: inputs, options: options)
        #expect(report.count == 2)
        for (i, r) in report.enumerated() {
            #expect(r.after.isFinite && r.after < r.before, "layer \(i): activated neurons \(r.before) → \(r.after)")
            #expect((3...9).contains(r.after))
        }
        #expect(model.moeBlocks.allSatisfy { !$0.routerWeight.requiresGrad })
        // The tuned model still runs, finite.
        let logits = try withNoGrad { try model.logits(TokenBatch(sequences: [[1, 2, 3, 4]])) }
        #expect(logits.scalars.allSatisfy { $0.isFinite })
        options.learningRate = -1
        #expect(throws: GraftError.self) { try HMoE.tuneRouters(model: model, inputs: inputs, options: options) }
        #expect(throws: GraftError.self) { try HMoE.tuneRouters(model: model, inputs: [inputs[0]], options: HMoERouterOptions()) }
    }

    @Test func hmoeBaseRoundTripsAndBadLayoutsAreNamed() throws {
        let model = try MoEficationTests.tinyLlama()
        try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1), options: Self.options(topK: 2))
        for b in model.moeBlocks { b.topP = 0.6 }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-hmoe-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try MoEBaseFormat.save(model: model, to: dir, method: .hmoe)
        let reloaded = try MoEficationTests.tinyLlama()
        try MoEBaseFormat.load(into: reloaded, from: dir)
        for (a, b) in zip(model.moeBlocks, reloaded.moeBlocks) {
            #expect(b.expertSizes == Self.sizes && b.topP == 0.6 && a.partition == b.partition)
            #expect(a.gateWeight.scalars == b.gateWeight.scalars && a.downWeight.scalars == b.downWeight.scalars)
        }
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        #expect(try withNoGrad { try model.logits(batch).scalars } == withNoGrad { try reloaded.logits(batch).scalars })
        let changes: [(field: String, value: Any)] = [("expert_sizes", [3, 5, 7, 10]), ("moe_layers", [0, 2]), ("method", "switch"), ("top_p", 1.5)]
        let refused = try loadsWithChangedConfig(path: dir + "/" + MoEBaseFormat.configName, changes: changes,
                                                 fresh: { try MoEficationTests.tinyLlama() }) { try MoEBaseFormat.load(into: $0, from: dir) }
        for ((message, fresh), change) in zip(refused, changes) {
            #expect(message?.contains(change.field) == true, "\(change.field): \(message ?? "accepted")")
            #expect(fresh.moeBlocks.isEmpty, "a refused load leaves the model dense")
        }
    }

    @Test func versionOneMoEficationBasesStillLoad() throws {
        let model = try MoEficationTests.tinyLlama()
        try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1),
                             options: MoEficationTests.options(experts: 4, topK: 2))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-moe-v1-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try MoEBaseFormat.save(model: model, to: dir)
        let path = dir + "/" + MoEBaseFormat.configName
        var config = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        #expect(config["version"] as? Int == 2 && config["method"] as? String == "moefication")
        config["version"] = 1
        for key in ["method", "expert_sizes", "moe_layers"] { config[key] = nil }
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: path))
        let reloaded = try MoEficationTests.tinyLlama()
        try MoEBaseFormat.load(into: reloaded, from: dir)
        #expect(reloaded.moeBlocks.count == 2 && reloaded.moeBlocks.allSatisfy { $0.expertSizes == [6, 6, 6, 6] })
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5]])
        #expect(try withNoGrad { try model.logits(batch).scalars } == withNoGrad { try reloaded.logits(batch).scalars })
    }
}
