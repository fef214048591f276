import Foundation
import Testing
import Graft
import GraftTestSupport

/// RMoE on a tiny random Llama made an MoE base (3 layers, E = 4, top-2): the GRU cell against its definition,
/// gradients through the recurrence across layers, statistics, save/load and KV-cached generation.
@Suite struct RMoETests {
    /// A 3-layer tiny Llama MoE-fied with E = 4, top-2.
    static func moeBase(seed: UInt64 = 21) throws -> LlamaModel {
        let model = try tinyRandomLlama(layers: 3, seed: seed, std: 0.5)
        try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1),
                              options: MoEficationTests.options(experts: 4, topK: 2))
        return model
    }

    /// Greedy generation with the KV cache against greedy argmax over uncached full passes, and the largest
    /// difference between a cached step's logits and the uncached pass's last position.
    static func cachedAgainstUncached(_ model: LlamaModel, prompt: [Int32], tokens: Int) throws -> (cached: [Int32], uncached: [Int32], worstLogit: Float) {
        let cached = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: tokens, temperature: 0, stopTokens: []))
        let v = model.config.vocabSize
        var sequence = prompt, uncached: [Int32] = []
        for _ in 0..<tokens {
            let logits = try withNoGrad { try model.logits(TokenBatch(ids: sequence, batchSize: 1, length: sequence.count)) }
            let last = logits.pointer + (sequence.count - 1) * v
            var best = 0
            for j in 1..<v where last[j] > last[best] { best = j }
            uncached.append(Int32(best))
            sequence.append(Int32(best))
        }
        let all = Array(sequence.dropLast())
        let cache = KVCache(layerCount: model.layers.count)
        _ = try withNoGrad { try model.hiddenStates(TokenBatch(ids: Array(all.dropLast()), batchSize: 1, length: all.count - 1), cache: cache) }
        let step = try withNoGrad { try model.lmHead.forward(model.hiddenStates(TokenBatch(ids: [all[all.count - 1]], batchSize: 1, length: 1), cache: cache)) }
        let full = try withNoGrad { try model.logits(TokenBatch(ids: all, batchSize: 1, length: all.count)) }
        let worst = worstOf((0..<v).map { abs(step.pointer[$0] - full.pointer[(all.count - 1) * v + $0]) }, empty: .nan)
        return (cached, uncached, worst)
    }

    @Test func gruCellIsTheGRUDefinition() throws {
        let model = try Self.moeBase()
        let rmoe = try RMoE(model: model, gruSize: 5, seed: 2)
        var rng = GraftRNG(seed: 6)
        let x = Tensor.randomNormal([3, 5], std: 1, rng: &rng), h = Tensor.randomNormal([3, 5], std: 0.7, rng: &rng)
        let out = withNoGrad { rmoe.cell(x, h) }
        let wi = rmoe.weightIH.scalars, wh = rmoe.weightHH.scalars, bi = rmoe.biasIH.scalars, bh = rmoe.biasHH.scalars
        func sig(_ v: Double) -> Double { 1 / (1 + exp(-v)) }
        var worst = 0.0
        for t in 0..<3 {
            // Row j of gate block k of W·v + b, in Double.
            func pre(_ w: [Float], _ b: [Float], _ v: Tensor, _ k: Int, _ j: Int) -> Double {
                (0..<5).reduce(Double(b[k * 5 + j])) { $0 + Double(w[(k * 5 + j) * 5 + $1]) * Double(v.scalars[t * 5 + $1]) }
            }
            for j in 0..<5 {
                let r = sig(pre(wi, bi, x, 0, j) + pre(wh, bh, h, 0, j)), z = sig(pre(wi, bi, x, 1, j) + pre(wh, bh, h, 1, j))
                let n = Foundation.tanh(pre(wi, bi, x, 2, j) + r * pre(wh, bh, h, 2, j))
                let expected = (1 - z) * n + z * Double(h.scalars[t * 5 + j])
                worst = worse(worst, abs(Double(out.scalars[t * 5 + j]) - expected))
            }
        }
        print("RMoE GRU cell against its definition: worst difference \(worst)")
        #expect(worst <= 1e-6, "GRU cell differs from the definition by \(worst)")
    }

    @Test func gradientsRunThroughTheGRUStateAcrossLayers() throws {
        let model = try Self.moeBase()
        let rmoe = try RMoE(model: model, gruSize: 4, tuneExperts: true, addsBaseLogits: false, seed: 3)
        // Routers strong enough that the routing moves the output.
        for r in rmoe.routers { for j in 0..<r.routerWeight.count { r.routerWeight.pointer[j] *= 100 } }
        rmoe.install()
        let params = rmoe.trainableParameters
        #expect(params.count == 4 + 3 * 3 + 3 * 3)
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9], [2, 6, 5, 3]])
        var rng = GraftRNG(seed: 5)
        let probe = Tensor.randomNormal([2, 6, 32], std: 1, rng: &rng)
        sum(mul(try model.logits(batch), probe)).backward()
        // W_hh sees a nonzero state only from layer 1 on: its gradient exists only through the recurrence.
        #expect(rmoe.weightHH.grad?.scalars.contains { $0 != 0 } == true)
        var checked: [(key: String, tensor: Tensor)] = [("gru.weight_ih", rmoe.weightIH), ("gru.weight_hh", rmoe.weightHH),
                                                        ("gru.bias_ih", rmoe.biasIH), ("gru.bias_hh", rmoe.biasHH)]
        for r in rmoe.routers {
            checked += [("\(r.layer).projection", r.projection), ("\(r.layer).router.weight", r.routerWeight), ("\(r.layer).router.bias", r.routerBias)]
        }
        checked.append(("0.experts.gate_proj", model.moeBlocks[0].gateWeight))
        let result = try finiteDifferenceCheck(checked, step: 1e-2, samples: 24, skipKinks: true, report: 5e-3) {
            let y = try withNoGrad { try model.logits(batch) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        print("RMoE finite differences (GRU, projections, routers, experts; 3 layers): worst relative error \(result.worst), \(result.kinks) kinks skipped")
        #expect(result.missing.isEmpty, "no gradient for \(result.missing)")
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        #expect(result.kinks < 40, "\(result.kinks) entries skipped as kinks")
    }

    @Test func statisticsSaveLoadRemoveAndCachedGeneration() throws {
        let model = try Self.moeBase()
        let batch = try TokenBatch(sequences: [Array(0..<20).map(Int32.init)])
        let baseLogits = try withNoGrad { try model.logits(batch) }
        let rmoe = try RMoE(model: model, gruSize: 6, tuneExperts: true, seed: 4)
        for r in rmoe.routers { for j in 0..<r.routerWeight.count { r.routerWeight.pointer[j] *= 50 } }
        for j in 0..<rmoe.blocks[1].upWeight.count { rmoe.blocks[1].upWeight.pointer[j] *= 1.1 }
        rmoe.install()
        #expect(model.moeBlocks.allSatisfy { $0.combine == .probability })
        model.resetMoERouterStatistics()
        let logits = try withNoGrad { try model.logits(batch) }
        for s in rmoe.statistics {
            #expect(s.tokens == 20 && s.dispatchedTokens.reduce(0, +) == 40 && s.overflowCount == 0)
            #expect(abs(s.load.reduce(0, +) - 1) < 1e-9 && s.meanEntropy > 0 && s.meanEntropy <= log(4.0) + 1e-6)
        }
        print("RMoE router statistics (tiny, E=4 k=2): mean entropy per layer \(rmoe.statistics.map { String(format: "%.3f", $0.meanEntropy) }), load \(rmoe.statistics.map { $0.load.map { String(format: "%.2f", $0) } })")

        let (cached, uncached, worstLogit) = try Self.cachedAgainstUncached(model, prompt: [4, 8, 15, 16, 23], tokens: 10)
        print("RMoE generation: cached \(cached), uncached \(uncached), last-step logit difference \(worstLogit)")
        #expect(cached == uncached && worstLogit < 1e-4, "cached and uncached differ by \(worstLogit)")

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-rmoe-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try RMoEFormat.save(rmoe, model: model, to: dir)
        let reloaded = try Self.moeBase()
        let loaded = try RMoEFormat.load(for: reloaded, from: dir)
        loaded.install()
        #expect(loaded.tunesExperts && loaded.addsBaseLogits && loaded.gruSize == 6)
        #expect(try withNoGrad { try reloaded.logits(batch).scalars } == logits.scalars)
        // The recurrent router is gone after remove: the base's logits again, bit for bit.
        rmoe.remove()
        for j in 0..<rmoe.blocks[1].upWeight.count { rmoe.blocks[1].upWeight.pointer[j] /= 1.1 }
        let restored = try withNoGrad { try model.logits(batch) }
        let err = worstOf(zip(restored.scalars, baseLogits.scalars).map { abs($0 - $1) }, empty: .nan)
        #expect(err <= 1e-5 && model.moeBlocks.allSatisfy { $0.combine == .sum && $0.router == nil }, "after remove: \(err)")
        // A config that does not fit is refused by field name.
        let path = dir + "/" + RMoEFormat.configName
        var config = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        config["experts"] = 8
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: path))
        let error = try #require(throws: GraftError.self) { _ = try RMoEFormat.load(for: try Self.moeBase(), from: dir) }
        #expect(error.message.contains("experts"))
        #expect(throws: GraftError.self) { _ = try RMoE(model: try tinyRandomLlama(layers: 2, std: 0.5)) }
        #expect(throws: GraftError.self) { _ = try RMoE(model: try Self.moeBase(), gruSize: 0) }
    }
}
