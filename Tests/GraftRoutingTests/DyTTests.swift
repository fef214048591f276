import Foundation
import Testing
import Graft
import GraftTestSupport

/// DyT on a tiny random Llama: the token dispatcher (exact at initialisation, hard skipping, straight-through and
/// soft gradients), the MoE adapter, training toward a target rate, cached generation, save/load.
@Suite struct DyTTests {
    static func options(experts: Int = 1, layers: [Int]? = nil, bias: Float = 3) -> DyTOptions {
        var o = DyTOptions()
        o.adapterDim = 4
        o.adapterExperts = experts
        o.layers = layers
        o.initialBias = bias
        o.seed = 5
        return o
    }

    /// Gives every adapter `up` weight random values, so the adapters add something.
    static func perturbAdapters(_ model: LlamaModel, seed: UInt64) {
        var rng = GraftRNG(seed: seed)
        for b in DyT.blocks(of: model) { for u in b.adapterUp { for i in 0..<u.count { u.pointer[i] = 0.3 * rng.nextNormal() } } }
    }

    @Test func aNewDyTIsTheDenseModelAndHardSkippingRunsTheFFNOnlyForDispatchedTokens() throws {
        let model = try MoEficationTests.tinyLlama()
        let batch = try TokenBatch(sequences: [[1, 5, 9, 3, 7], [2, 4, 6]])
        let dense = try withNoGrad { try model.logits(batch) }
        let blocks = try DyT.apply(to: model, options: Self.options(experts: 2))
        #expect(blocks.count == 2)
        let routed = try withNoGrad { try model.logits(batch) }
        #expect(routed.scalars == dense.scalars, "a new DyT (every token dispatched, adapters zero) is the dense model")
        #expect(DyT.activationRate(of: model) == 1)
        // A dispatcher whose score is positive for some tokens only: those rows get FFN + adapter, the others the
        // adapter alone.
        Self.perturbAdapters(model, seed: 3)
        let block = blocks[0], layer = model.layers[0]
        var rng = GraftRNG(seed: 8)
        let x = Tensor.randomNormal([10, 16], std: 1, rng: &rng)
        block.dispatcherBias.pointer[0] = 0
        let scores = withNoGrad { linear(x, block.dispatcherWeight, block.dispatcherBias) }.scalars
        #expect(scores.contains { $0 > 0 } && scores.contains { $0 <= 0 })
        DyT.resetStatistics(of: model)
        let y = withNoGrad { block.forward(x) }
        let ffn = withNoGrad { layer.downProj.forward(swiglu(layer.gateProj.forward(x), layer.upProj.forward(x))) }
        let adapter = withNoGrad { block.adapterOutput(x) }
        for t in 0..<10 {
            for j in 0..<16 {
                let expected = (scores[t] > 0 ? ffn.scalars[t * 16 + j] : 0) + adapter.scalars[t * 16 + j]
                #expect(abs(y.scalars[t * 16 + j] - expected) <= 1e-5 * max(1, abs(expected)))
            }
        }
        let stats = block.statistics
        #expect(model.depthRouterStatistics.count == 2 && model.depthRouterStatistics[0] == stats, "the model's depth statistics list the dispatchers")
        #expect(stats.tokens == 10 && stats.dispatchedTokens[1] == scores.filter { $0 > 0 }.count)
        #expect(abs(stats.meanDepth - Double(scores.filter { $0 > 0 }.count) / 10) < 1e-9)
        #expect(stats.summary["mean_depth"] != nil)
    }

    @Test func softGradientsMatchFiniteDifferencesAndStraightThroughSharesTheDispatcherGradient() throws {
        let model = try MoEficationTests.tinyLlama()
        let block = try #require(try DyT.apply(to: model, options: Self.options(experts: 3, bias: 0)).first)
        Self.perturbAdapters(model, seed: 4)
        var rng = GraftRNG(seed: 11)
        let x = Tensor.randomNormal([6, 16], std: 1, rng: &rng).requiringGrad()
        let probe = Tensor.randomNormal([6, 16], std: 1, rng: &rng)
        let params = DyT.trainableParameters(of: model)
        #expect(params.count == 2 * (2 + 3 + 3 + 1))
        block.mode = .soft
        sum(mul(block.forward(x), probe)).backward()
        var checked: [(key: String, tensor: Tensor)] = [("x", x), ("dispatcher.weight", block.dispatcherWeight),
                                                        ("dispatcher.bias", block.dispatcherBias),
                                                        ("adapter.router", try #require(block.adapterRouter))]
        for e in 0..<3 { checked += [("down\(e)", block.adapterDown[e]), ("up\(e)", block.adapterUp[e])] }
        let result = finiteDifferenceCheck(checked, step: 1e-2, samples: 40) {
            let y = withNoGrad { block.forward(x) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        let softGrad = try #require(block.dispatcherWeight.grad).scalars
        #expect(softGrad.contains { $0 != 0 } && softGrad.allSatisfy { $0.isFinite })
        // Straight-through without noise: the hard forward pass, the relaxed gate's gradient for the dispatcher.
        for p in params { p.grad = nil }
        block.mode = .straightThrough
        block.explorationNoise = 0
        let st = block.forward(x)
        block.mode = .hard
        let hard = withNoGrad { block.forward(x) }
        #expect(HMoETests.relativeError(st, hard) <= 1e-5)
        block.mode = .straightThrough
        sum(mul(block.forward(x), probe)).backward()
        let stGrad = try #require(block.dispatcherWeight.grad).scalars
        let err = worstOf(zip(stGrad, softGrad).map { abs($0 - $1) / max(1e-3, abs($1)) }, empty: .nan)
        #expect(err <= 1e-4, "straight-through dispatcher gradient differs from the soft one by \(err)")
    }

    @Test func trainingPullsTheActivationRateToTheTargetAndLowersTheLoss() throws {
        let model = try MoEficationTests.tinyLlama()
        try DyT.apply(to: model, options: Self.options(bias: 1))
        DyT.setMode(.straightThrough, of: model)
        let sequences = MoEficationTests.sequences(4, length: 12, seed: 7)
        let batch = try TokenBatch(sequences: sequences)
        let targets: [Int32] = sequences.flatMap { s in Array(s.dropFirst()) + [-100] }
        let optimizer = AdamW(parameters: DyT.trainableParameters(of: model), learningRate: 3e-2, weightDecay: 0)
        var rates: [Double] = [], losses: [Float] = []
        for _ in 0..<40 {
            let (loss, rate) = try DyT.trainingLoss(model: model, batch: batch, targets: targets, targetRate: 0.25, rateWeight: 5)
            losses.append(loss.item)
            rates.append(rate)
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
        }
        #expect(losses.allSatisfy { $0.isFinite } && rates.allSatisfy { $0.isFinite })
        let late = rates.suffix(5).reduce(0, +) / 5
        #expect(rates[0] > 0.6 && late < 0.45, "activation rate \(rates[0]) → \(late)")
        #expect(losses.suffix(5).reduce(0, +) / 5 < losses[0], "loss \(losses[0]) → \(losses.suffix(5))")
        #expect(throws: GraftError.self) {
            try DyT.trainingLoss(model: model, batch: batch, targets: [1], targetRate: 0.5, rateWeight: 1)
        }
    }

    @Test func cachedGreedyGenerationEqualsUncachedRunsWhenTokensSkip() throws {
        let model = try MoEficationTests.tinyLlama()
        try DyT.apply(to: model, options: Self.options(bias: 0))
        Self.perturbAdapters(model, seed: 6)
        let prompt: [Int32] = [4, 8, 15, 16, 23]
        let generated = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 8, temperature: 0, stopTokens: []))
        #expect(generated.count == 8)
        #expect(try uncachedGreedy(model, prompt: prompt, steps: 8) == generated)
        let rate = DyT.activationRate(of: model)
        #expect(rate > 0 && rate < 1, "some tokens skipped and some ran: rate \(rate)")
    }

    @Test func saveAndLoadRoundTripAndBadFilesAreNamed() throws {
        let model = try MoEficationTests.tinyLlama()
        try DyT.apply(to: model, options: Self.options(experts: 2, layers: [1], bias: 0.5))
        Self.perturbAdapters(model, seed: 9)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-dyt-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try DyTFormat.save(model: model, to: dir, extra: ["target_rate": 0.5])
        let reloaded = try MoEficationTests.tinyLlama()
        try DyTFormat.load(into: reloaded, from: dir)
        #expect(reloaded.layers[0].feedForwardOverride == nil && DyT.blocks(of: reloaded).count == 1)
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        #expect(try withNoGrad { try model.logits(batch).scalars } == withNoGrad { try reloaded.logits(batch).scalars })
        let changes: [(field: String, value: Any)] = [("adapter_dim", 8), ("dyt_layers", [2]), ("hidden_size", 32), ("adapter_experts", 0)]
        let refused = try loadsWithChangedConfig(path: dir + "/" + DyTFormat.configName, changes: changes,
                                                 fresh: { try MoEficationTests.tinyLlama() }) { try DyTFormat.load(into: $0, from: dir) }
        for ((message, fresh), named) in zip(refused, ["adapter.0.down.weight", "layers [2]", "hidden_size", "adapter_experts"]) {
            #expect(message?.contains(named) == true, "\(named): \(message ?? "accepted")")
            #expect(DyT.blocks(of: fresh).isEmpty, "a refused load leaves the model unchanged")
        }
    }
}
