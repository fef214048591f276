import Foundation
import Testing
import Graft
import GraftTestSupport

/// WideNet (seed #86) on a tiny random Llama: the grouped layers share one router and one set of experts (their
/// FFNs) with their own norms; gradients from both layers reach the shared weights; the fitted router sends each
/// layer's tokens to its own FFN; training, statistics, save/load, cached generation and refusals.
@Suite struct WideNetTests {
    static func options(topK: Int = 1) -> WideNetOptions {
        var o = WideNetOptions()
        o.groupSize = 2
        o.topK = topK
        o.maxTokens = 200
        return o
    }

    static func wideNet(topK: Int = 1) throws -> LlamaModel {
        let model = try MoEficationTests.tinyLlama()
        try WideNet.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1), options: options(topK: topK))
        return model
    }

    @Test func layersShareOneBlockAndTheRouterSendsEachLayerToItsOwnFFN() throws {
        let model = try Self.wideNet()
        let blocks = WideNet.blocks(of: model).compactMap { $0 }
        #expect(blocks.count == 2 && blocks[0] !== blocks[1])
        #expect(blocks[0].routerWeight === blocks[1].routerWeight && blocks[0].gateWeight === blocks[1].gateWeight
                && blocks[0].downWeight === blocks[1].downWeight, "one router and one expert set for the group")
        #expect(blocks.allSatisfy { $0.experts == 2 && $0.sharedByLayers == [0, 1] && $0.combine == .probability })
        // Expert j is layer j's FFN: on layer j's FFN inputs, expert j's output is the dense block's.
        let dense = try MoEficationTests.tinyLlama()
        var rng = GraftRNG(seed: 3)
        let x = Tensor.randomNormal([5, 16], std: 1, rng: &rng)
        for j in 0..<2 {
            let expert = withNoGrad {
                routedSwiGLUExperts(x, gate: blocks[0].gateWeight, up: blocks[0].upWeight, down: blocks[0].downWeight, weights: nil,
                                    rows: [j == 0 ? (0..<5).map { Int32($0) } : [], j == 1 ? (0..<5).map { Int32($0) } : []], sizes: nil)
            }.scalars
            let layer = dense.layers[j]
            let reference = withNoGrad {
                layer.downProj.baseForward(swiglu(layer.gateProj.baseForward(x), layer.upProj.baseForward(x)))
            }.scalars
            let scale = reference.map { abs($0) }.max() ?? 1
            #expect(zip(expert, reference).allSatisfy { abs($0 - $1) <= 1e-5 * scale }, "expert \(j) is layer \(j)'s FFN")
        }
        model.resetMoERouterStatistics()
        _ = try withNoGrad { try model.logits(TokenBatch(sequences: MoEficationTests.sequences(4, length: 20, seed: 9))) }
        let share = WideNet.ownLayerShare(of: model)
        print(String(format: "WideNet tiny: %.3f of the tokens run their own layer's FFN", share))
        #expect(share > 0.6, "the fitted shared router sends most of each layer's tokens to its own FFN (chance 0.5): \(share)")
        #expect(model.moeRouterStatistics.allSatisfy { $0.tokens == 80 })
    }

    @Test func gradientsFromBothLayersReachTheSharedWeightsAndTrainingLowersTheLoss() throws {
        let model = try Self.wideNet()
        let params = WideNet.trainableParameters(of: model, experts: true)
        #expect(params.count == 2 + 4 + 3, "router weight and bias once, two norms per layer, experts once")
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
        var rng = GraftRNG(seed: 4)
        let probe = Tensor.randomNormal([2 * 8 * 32], std: 1, rng: &rng)
        sum(mul(try model.logits(batch).reshaped([2 * 8 * 32]), probe)).backward()
        let named = zip(["router.weight", "router.bias", "norm0.in", "norm0.post", "norm1.in", "norm1.post", "gate", "up", "down"], params)
            .map { ($0.0, $0.1) }
        let result = try finiteDifferenceCheck(named, step: 1e-2, samples: 24, skipKinks: true) {
            let y = try withNoGrad { try model.logits(batch) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        print("WideNet gradients: worst relative error \(result.worst), \(result.kinks) kinks skipped")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        for p in params { p.grad = nil; p.requiringGrad(false) }

        let trainable = WideNet.trainableParameters(of: model)
        let optimizer = AdamW(parameters: trainable, learningRate: 1e-2, weightDecay: 0)
        let sequences = MoEficationTests.sequences(6, length: 16, seed: 7)
        let targets: [Int32] = sequences.flatMap { Array($0.dropFirst()) + [-100] }
        func loss() throws -> Float { try withNoGrad { try model.moeTrainingLoss(batch: TokenBatch(sequences: sequences), targets: targets).item } }
        let before = try loss()
        for _ in 0..<10 {
            try model.moeTrainingLoss(batch: TokenBatch(sequences: sequences), targets: targets).backward()
            optimizer.step()
            optimizer.zeroGrad()
        }
        let after = try loss()
        print(String(format: "WideNet tiny: loss %.4f -> %.4f in 10 steps (routers and norms, %d tensors)", before, after, trainable.count))
        #expect(before.isFinite && after < before - 1e-3)
    }

    @Test func saveLoadGenerationAndRefusals() throws {
        let model = try Self.wideNet(topK: 2)
        for layer in model.layers { for i in 0..<16 { layer.inputNorm.weight.pointer[i] += 0.01 * Float(i) } }
        let blocks = WideNet.blocks(of: model).compactMap { $0 }
        #expect(blocks.allSatisfy { $0.combine == .normalizedProbability })
        blocks[0].downWeight.pointer[3] += 0.5
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        let logits = try withNoGrad { try model.logits(batch) }.scalars
        for experts in [true, false] {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-widenet-\(UUID().uuidString)").path
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try WideNetFormat.save(model: model, to: dir, experts: experts)
            let fresh = try MoEficationTests.tinyLlama()
            try WideNetFormat.load(into: fresh, from: dir)
            let again = try withNoGrad { try fresh.logits(batch) }.scalars
            // Without the trained expert entry the reload differs exactly there; with it, bit for bit.
            #expect((again == logits) == experts)
            if experts {
                let prompt: [Int32] = [4, 8, 15]
                let out = try fresh.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
                #expect(out == (try uncachedGreedy(fresh, prompt: prompt, steps: 6)))
                let refused = try loadsWithChangedConfig(path: dir + "/" + WideNetFormat.configName,
                                                         changes: [("groups", [[0, 2]]), ("top_k", 3), ("format", "other"), ("groups", [[0, 1, 2]])],
                                                         fresh: { try MoEficationTests.tinyLlama() }) { try WideNetFormat.load(into: $0, from: dir) }
                for (message, m) in refused {
                    #expect(message?.contains(WideNetFormat.configName) == true, "\(message ?? "loaded")")
                    #expect(m.moeBlocks.isEmpty, "a refused load leaves the model dense")
                }
            }
        }
        // Settings that do not fit are refused by name, leaving the model dense.
        for (change, needle): (WideNetOptions, String) in [
            ({ var o = Self.options(); o.groupSize = 1; return o }(), "group size"),
            ({ var o = Self.options(); o.topK = 3; return o }(), "top_k 3"),
            ({ var o = Self.options(); o.layers = [0]; return o }(), "divide"),
        ] {
            let dense = try MoEficationTests.tinyLlama()
            let error = try #require(throws: GraftError.self) {
                try WideNet.apply(to: dense, sequences: MoEficationTests.sequences(4, length: 20, seed: 1), options: change)
            }
            #expect(error.message.contains(needle), "\(error.message)")
            #expect(dense.moeBlocks.isEmpty)
        }
    }
}
