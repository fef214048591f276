import Foundation
import Testing
import Graft
import GraftTestSupport

/// Test-time router rewiring on a tiny random Llama made an MoE base (3 layers, E = 4, top-2, probability
/// combining): gradients of the logit offsets, adaptation that lowers the context loss and changes no weight,
/// save/load, removal and KV-cached generation with the rewired routers.
@Suite struct RouterRewiringTests {
    static func base() throws -> LlamaModel {
        let model = try RMoETests.moeBase()
        for b in model.moeBlocks { b.combine = .probability }
        return model
    }

    @Test func offsetGradientsMatchFiniteDifferences() throws {
        let model = try Self.base()
        let rewiring = try RouterRewiring(model: model)
        var rng = GraftRNG(seed: 7)
        for o in rewiring.offsets { for j in 0..<o.count { o.pointer[j] = rng.nextNormal() } }
        rewiring.install()
        for o in rewiring.offsets { o.requiringGrad() }
        let ids: [Int32] = [5, 3, 9, 1, 30, 12, 7, 7, 2]
        try RouterRewiring.contextLoss(model: model, ids: ids).backward()
        let result = try finiteDifferenceCheck(rewiring.offsets.enumerated().map { ("layer \($0.offset)", $0.element) },
                                               step: 1e-3, skipKinks: true) {
            Double(try withNoGrad { try RouterRewiring.contextLoss(model: model, ids: ids) }.item)
        }
        print("router rewiring finite differences (3 layers × 4 offsets): worst relative error \(result.worst), \(result.kinks) kinks skipped")
        #expect(result.missing.isEmpty && result.kinks < 6)
        #expect(result.worst <= 1e-2, "worst relative gradient error \(result.worst)")
        #expect(rewiring.offsets.allSatisfy { $0.grad?.scalars.contains { $0 != 0 } == true })
    }

    @Test func adaptationLowersTheContextLossWithoutChangingAWeight() throws {
        let model = try Self.base()
        let weights = model.namedParameters().map { $0.tensor.scalars }
        let context: [Int32] = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
        let before = try withNoGrad { try model.logits(TokenBatch(ids: context, batchSize: 1, length: context.count)) }
        let rewiring = try RouterRewiring(model: model, layers: [0, 2])
        let losses = try rewiring.adapt(model: model, context: context, steps: 20, learningRate: 0.2)
        print("router rewiring on a 20-token context (layers 0 and 2, 20 Adam steps, lr 0.2): loss \(losses.first ?? .nan) -> \(losses.last ?? .nan)")
        #expect(losses.count == 21 && losses.allSatisfy(\.isFinite))
        #expect((losses.last ?? .nan) < (losses.first ?? .nan) - 1e-3)
        #expect(model.namedParameters().map { $0.tensor.scalars } == weights, "a model weight changed")
        #expect(model.moeBlocks[1].logitOffset == nil && rewiring.offsets.allSatisfy { $0.grad == nil && !$0.requiresGrad })

        // Generation with the rewired routers: cached steps give the uncached passes' tokens.
        let (cached, uncached, worstLogit) = try RMoETests.cachedAgainstUncached(model, prompt: Array(context.prefix(6)), tokens: 8)
        #expect(cached == uncached && worstLogit < 1e-4, "cached and uncached differ by \(worstLogit)")
        let generated = try rewiring.generate(model: model, prompt: context, parameters: GenerationParameters(maxNewTokens: 4, temperature: 0, stopTokens: []),
                                              steps: 20, learningRate: 0.2)
        #expect(generated.count == 4)

        let rewired = try withNoGrad { try model.logits(TokenBatch(ids: context, batchSize: 1, length: context.count)) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-rewiring-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try RouterRewiringFormat.save(rewiring, model: model, to: dir)
        rewiring.remove()
        let removed = try withNoGrad { try model.logits(TokenBatch(ids: context, batchSize: 1, length: context.count)) }
        #expect(removed.scalars == before.scalars, "after remove the routers are the model's own")
        let other = try Self.base()
        let loaded = try RouterRewiringFormat.load(for: other, from: dir)
        #expect(loaded.layers == [0, 2])
        #expect(try withNoGrad { try other.logits(TokenBatch(ids: context, batchSize: 1, length: context.count)) }.scalars == rewired.scalars)

        // Refusals name what is wrong.
        let summed = try RMoETests.moeBase()
        let e1 = try #require(throws: GraftError.self) { _ = try RouterRewiring(model: summed) }
        #expect(e1.message.contains("combine"))
        #expect(throws: GraftError.self) { _ = try RouterRewiring(model: model, layers: [0, 0]) }
        #expect(throws: GraftError.self) { _ = try RouterRewiring(model: model, layers: [3]) }
        #expect(throws: GraftError.self) { try rewiring.adapt(model: model, context: [1], steps: 1, learningRate: 0.1) }
        let e2 = try #require(throws: GraftError.self) { _ = try RouterRewiringFormat.load(for: try tinyRandomLlama(layers: 2, std: 0.5), from: dir) }
        #expect(e2.message.contains("layers"))
    }
}
