import Foundation
import Testing
import Graft
import GraftTestSupport

/// Duo-LLM on a tiny random Llama: the small FFN (the dense one's important neurons), the skip/small/big router
/// (exact at initialisation, hard routing, soft and straight-through gradients), training toward a compute
/// target, cached generation, save/load.
@Suite struct DuoLLMTests {
    static func options(layers: [Int]? = nil, bias: Float = 3) -> DuoLLMOptions {
        var o = DuoLLMOptions()
        o.smallSize = 8
        o.layers = layers
        o.initialBias = bias
        o.maxTokens = 200
        o.seed = 2
        return o
    }

    static func make(_ options: DuoLLMOptions = options()) throws -> (LlamaModel, [DuoLLMFeedForward]) {
        let model = try MoEficationTests.tinyLlama()
        let blocks = try DuoLLM.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1), options: options)
        return (model, blocks)
    }

    /// Sets every router to random weights and zero biases, so tokens spread over the three choices.
    static func spreadRouters(_ model: LlamaModel, seed: UInt64) {
        var rng = GraftRNG(seed: seed)
        for b in DuoLLM.blocks(of: model) {
            for i in 0..<b.routerWeight.count { b.routerWeight.pointer[i] = 0.5 * rng.nextNormal() }
            for i in 0..<3 { b.routerBias.pointer[i] = 0 }
        }
    }

    @Test func aNewDuoLLMIsTheDenseModelAndEachTokenRunsItsChoice() throws {
        let model = try MoEficationTests.tinyLlama()
        let batch = try TokenBatch(sequences: [[1, 5, 9, 3, 7], [2, 4, 6]])
        let dense = try withNoGrad { try model.logits(batch) }
        let blocks = try DuoLLM.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1), options: Self.options())
        #expect(blocks.count == 2 && blocks[0].costs == [0, 8.0 / 24, 1])
        #expect(try withNoGrad { try model.logits(batch) }.scalars == dense.scalars, "a new Duo-LLM runs the dense FFN for every token")
        #expect(DuoLLM.measuredCompute(of: model) == 1)
        // The small FFN is the dense one restricted to its important neurons.
        let block = blocks[0], layer = model.layers[0]
        var rng = GraftRNG(seed: 8)
        let x = Tensor.randomNormal([10, 16], std: 1, rng: &rng)
        let inputs = try MoEfication.collectFeedForwardInputs(model: try MoEficationTests.tinyLlama(), sequences: MoEficationTests.sequences(12, length: 20, seed: 1), maxTokens: 200)
        let neurons = DuoLLM.importantNeurons(layer: layer, inputs: inputs[0], count: 8)
        #expect(neurons.count == 8 && Set(neurons).count == 8 && neurons == neurons.sorted())
        let a = withNoGrad { swiglu(layer.gateProj.forward(x), layer.upProj.forward(x)) }
        var masked = [Float](repeating: 0, count: a.count)
        for t in 0..<10 { for n in neurons { masked[t * 24 + Int(n)] = a.scalars[t * 24 + Int(n)] } }
        let reference = withNoGrad { layer.downProj.forward(Tensor(shape: [10, 24], values: masked)) }
        let small = withNoGrad { block.smallFeedForward(x) }
        #expect(HMoETests.relativeError(small, reference) <= 1e-5)
        // Routers that spread the tokens: each row is zero, the small FFN's or the dense FFN's.
        Self.spreadRouters(model, seed: 3)
        DuoLLM.resetStatistics(of: model)
        let y = withNoGrad { block.forward(x) }
        let big = withNoGrad { layer.downProj.forward(a) }
        let scores = withNoGrad { linear(x, block.routerWeight, block.routerBias) }.scalars
        var seen = Set<Int>(), worst: Float = 0
        for t in 0..<10 {
            let row = scores[(t * 3)..<(t * 3 + 3)]
            let choice = try #require(row.indices.max { row[$0] < row[$1] }) - t * 3
            seen.insert(choice)
            for j in 0..<16 {
                let expected = choice == 0 ? 0 : choice == 1 ? small.scalars[t * 16 + j] : big.scalars[t * 16 + j]
                worst = max(worst, abs(y.scalars[t * 16 + j] - expected) / max(1, abs(expected)))
            }
        }
        #expect(worst <= 1e-5, "routed rows differ from their choice's module by \(worst)")
        #expect(seen.count >= 2, "the spread router used choices \(seen)")
        let stats = block.statistics
        #expect(model.depthRouterStatistics.count == 2 && model.depthRouterStatistics[0] == stats, "the model's depth statistics list the dispatchers")
        #expect(stats.tokens == 10 && stats.dispatchedTokens.reduce(0, +) == 10)
        #expect(abs(stats.meanDepth - Double(stats.dispatchedTokens[1] + stats.dispatchedTokens[2]) / 10) < 1e-9)
        #expect(block.measuredCompute <= 1 && block.measuredCompute >= 0)
    }

    @Test func softGradientsMatchFiniteDifferencesAndStraightThroughSharesTheRouterGradient() throws {
        let (model, blocks) = try Self.make()
        Self.spreadRouters(model, seed: 5)
        let block = try #require(blocks.first)
        var rng = GraftRNG(seed: 11)
        let x = Tensor.randomNormal([6, 16], std: 1, rng: &rng).requiringGrad()
        let probe = Tensor.randomNormal([6, 16], std: 1, rng: &rng)
        let params = DuoLLM.trainableParameters(of: model)
        #expect(params.count == 2 * 5)
        block.mode = .soft
        sum(mul(block.forward(x), probe)).backward()
        let result = finiteDifferenceCheck([("x", x), ("router.weight", block.routerWeight), ("router.bias", block.routerBias),
                                            ("small.gate", block.smallGate), ("small.up", block.smallUp), ("small.down", block.smallDown)],
                                           step: 1e-2, samples: 48) {
            let y = withNoGrad { block.forward(x) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        let softGrad = try #require(block.routerWeight.grad).scalars
        #expect(softGrad.contains { $0 != 0 } && softGrad.allSatisfy { $0.isFinite })
        for p in params { p.grad = nil }
        block.mode = .straightThrough
        block.explorationNoise = 0
        let st = block.forward(x)
        block.mode = .hard
        #expect(HMoETests.relativeError(st, withNoGrad { block.forward(x) }) <= 1e-5, "straight-through's forward pass is the hard one")
        block.mode = .straightThrough
        sum(mul(block.forward(x), probe)).backward()
        let stGrad = try #require(block.routerWeight.grad).scalars
        let err = worstOf(zip(stGrad, softGrad).map { abs($0 - $1) / max(1e-3, abs($1)) }, empty: .nan)
        #expect(err <= 1e-4, "straight-through router gradient differs from the soft one by \(err)")
    }

    @Test func trainingPullsTheComputeToTheTargetAndLowersTheLoss() throws {
        let (model, _) = try Self.make(Self.options(bias: 1))
        DuoLLM.setMode(.straightThrough, of: model)
        let sequences = MoEficationTests.sequences(4, length: 12, seed: 7)
        let batch = try TokenBatch(sequences: sequences)
        let targets: [Int32] = sequences.flatMap { s in Array(s.dropFirst()) + [-100] }
        let optimizer = AdamW(parameters: DuoLLM.trainableParameters(of: model), learningRate: 3e-2, weightDecay: 0)
        var computes: [Double] = [], losses: [Float] = []
        for _ in 0..<40 {
            let (loss, compute) = try DuoLLM.trainingLoss(model: model, batch: batch, targets: targets, targetCompute: 0.3, computeWeight: 5)
            losses.append(loss.item)
            computes.append(compute)
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
        }
        #expect(losses.allSatisfy { $0.isFinite } && computes.allSatisfy { $0.isFinite })
        let late = computes.suffix(5).reduce(0, +) / 5
        #expect(computes[0] > 0.55 && late < 0.45, "compute \(computes[0]) → \(late)")
        #expect(losses.suffix(5).reduce(0, +) / 5 < losses[0], "loss \(losses[0]) → \(losses.suffix(5))")
        #expect(throws: GraftError.self) {
            try DuoLLM.trainingLoss(model: model, batch: batch, targets: [1], targetCompute: 0.5, computeWeight: 1)
        }
    }

    @Test func cachedGreedyGenerationEqualsUncachedRunsWithMixedChoices() throws {
        let (model, _) = try Self.make()
        Self.spreadRouters(model, seed: 6)
        let prompt: [Int32] = [4, 8, 15, 16, 23]
        let generated = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 8, temperature: 0, stopTokens: []))
        #expect(try uncachedGreedy(model, prompt: prompt, steps: 8) == generated)
        let histogram = DuoLLM.blocks(of: model).map(\.statistics.dispatchedTokens).reduce([0, 0, 0]) { zip($0, $1).map(+) }
        #expect(histogram.filter { $0 > 0 }.count >= 2, "choices taken: \(histogram)")
    }

    @Test func saveAndLoadRoundTripAndBadFilesAreNamed() throws {
        let (model, _) = try Self.make(Self.options(layers: [1]))
        Self.spreadRouters(model, seed: 9)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-duo-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try DuoLLMFormat.save(model: model, to: dir, extra: ["target_compute": 0.5])
        let reloaded = try MoEficationTests.tinyLlama()
        try DuoLLMFormat.load(into: reloaded, from: dir)
        #expect(reloaded.layers[0].feedForwardOverride == nil && DuoLLM.blocks(of: reloaded).count == 1)
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        #expect(try withNoGrad { try model.logits(batch).scalars } == withNoGrad { try reloaded.logits(batch).scalars })
        let changes: [(field: String, value: Any)] = [("small_size", 6), ("duo_layers", [3]), ("intermediate_size", 48), ("small_size", 24)]
        let refused = try loadsWithChangedConfig(path: dir + "/" + DuoLLMFormat.configName, changes: changes,
                                                 fresh: { try MoEficationTests.tinyLlama() }) { try DuoLLMFormat.load(into: $0, from: dir) }
        for ((message, fresh), named) in zip(refused, ["small.gate_proj", "layers [3]", "intermediate_size", "small_size"]) {
            #expect(message?.contains(named) == true, "\(named): \(message ?? "accepted")")
            #expect(DuoLLM.blocks(of: fresh).isEmpty, "a refused load leaves the model unchanged")
        }
    }
}
