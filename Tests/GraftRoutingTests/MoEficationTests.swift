import Foundation
import Testing
import Graft
import GraftTestSupport

/// MoEfication on a tiny random Llama: the partition, the routed SwiGLU experts (exact at k = E, gradients), the
/// router statistics, save/load and generation.
@Suite struct MoEficationTests {
    /// A 2-layer Llama, hidden 16, intermediate 24, vocabulary 32, random weights.
    static func tinyLlama(seed: UInt64 = 21) throws -> LlamaModel { try tinyRandomLlama(layers: 2, seed: seed, std: 0.5) }

    /// Random calibration sequences over the tiny vocabulary.
    static func sequences(_ count: Int, length: Int, seed: UInt64) -> [[Int32]] {
        var rng = GraftRNG(seed: seed)
        return (0..<count).map { _ in (0..<length).map { _ in Int32(rng.next() % 32) } }
    }

    static func options(experts: Int, topK: Int) -> MoEficationOptions {
        var o = MoEficationOptions()
        o.experts = experts
        o.topK = topK
        o.maxTokens = 200
        return o
    }

    static func allFinite(_ t: Tensor) -> Bool { t.scalars.allSatisfy(\.isFinite) }

    @Test func balancedKMeansIsABalancedPermutationThatFindsPlantedClusters() throws {
        // 48 neurons in 4 planted groups: each group fires on its own quarter of 40 tokens.
        var rng = GraftRNG(seed: 3)
        let items = 48, dims = 40, clusters = 4
        let truth = (0..<items).map { ($0 * 7) % clusters }
        var values = [Float](repeating: 0, count: items * dims)
        for i in 0..<items {
            for d in 0..<dims { values[i * dims + d] = abs(0.1 * rng.nextNormal()) + (d / 10 == truth[i] ? 1 : 0) }
        }
        let profiles = Tensor(shape: [items, dims], values: values)
        let p = try MoEPartition.balancedKMeans(profiles: profiles, clusters: clusters, iterations: 20, seed: 5)
        try MoEPartition.validate(p, neurons: items, what: "test")
        #expect(Set(p.map(Int.init)) == Set(0..<items))
        for c in 0..<clusters {
            let group = p[(c * 12)..<((c + 1) * 12)].map { truth[Int($0)] }
            #expect(Set(group).count == 1, "expert \(c) mixes planted groups: \(group)")
        }
        #expect(try MoEPartition.balancedKMeans(profiles: profiles, clusters: clusters, iterations: 20, seed: 5) == p)
        #expect(throws: GraftError.self) { try MoEPartition.balancedKMeans(profiles: profiles, clusters: 5, iterations: 3, seed: 0) }
        #expect(throws: GraftError.self) { try MoEPartition.validate([0, 1, 1], neurons: 3, what: "dup") }
    }

    @Test func routedBlockAtKEqualsEIsTheDenseBlock() throws {
        let model = try Self.tinyLlama()
        let reports = try MoEfication.apply(to: model, sequences: Self.sequences(12, length: 20, seed: 1),
                                            options: Self.options(experts: 4, topK: 4))
        #expect(reports.count == 2)
        var rng = GraftRNG(seed: 9)
        let x = Tensor.randomNormal([3, 5, 16], std: 1, rng: &rng)
        for (i, layer) in model.layers.enumerated() {
            let block = try #require(layer.feedForwardOverride as? MoEFeedForward)
            #expect(block.partition.count == 24)
            let dense = withNoGrad { layer.downProj.forward(swiglu(layer.gateProj.forward(x), layer.upProj.forward(x))) }
            let routed = withNoGrad { block.forward(x) }
            #expect(routed.shape == dense.shape)
            #expect(Self.allFinite(routed))
            let err = worstOf(zip(routed.scalars, dense.scalars).map { abs($0 - $1) }, empty: .nan)
            #expect(err <= 1e-5, "layer \(i): k = E differs from dense by \(err)")
            // With k < E the block drops experts, so it must differ.
            block.topK = 1
            let sparse = withNoGrad { block.forward(x) }
            #expect(zip(sparse.scalars, dense.scalars).contains { abs($0 - $1) > 1e-3 })
            block.topK = 4
        }
        // The whole model: logits at k = E equal the dense model's.
        let batch = try TokenBatch(sequences: [[1, 5, 9, 3, 7], [2, 4, 6]])
        let moeLogits = try withNoGrad { try model.logits(batch) }
        let saved = model.layers.map(\.feedForwardOverride)
        model.removeMoEBlocks()
        let denseLogits = try withNoGrad { try model.logits(batch) }
        for (l, b) in zip(model.layers, saved) { l.feedForwardOverride = b }
        let err = worstOf(zip(moeLogits.scalars, denseLogits.scalars).map { abs($0 - $1) }, empty: .nan)
        #expect(err <= 1e-5, "logits at k = E differ from dense by \(err)")
    }

    @Test func routedExpertGradientsMatchFiniteDifferences() throws {
        // Top-2 of 3 experts with explicit rows and tracked weights: x, every expert matrix and the weights.
        var rng = GraftRNG(seed: 13)
        let t = 6, h = 5, m = 4, e = 3
        let x = Tensor.randomNormal([t, h], std: 1, rng: &rng).requiringGrad()
        let gate = Tensor.randomNormal([e, m, h], std: 0.5, rng: &rng).requiringGrad()
        let up = Tensor.randomNormal([e, m, h], std: 0.5, rng: &rng).requiringGrad()
        let down = Tensor.randomNormal([e, h, m], std: 0.5, rng: &rng).requiringGrad()
        let weights = Tensor.randomNormal([t, e], std: 1, rng: &rng).requiringGrad()
        let rows: [[Int32]?] = [[0, 2, 3, 5], nil, [1, 4]]
        let probe = Tensor.randomNormal([t, h], std: 1, rng: &rng)
        func objective() -> Double {
            let y = withNoGrad { routedSwiGLUExperts(x, gate: gate, up: up, down: down, weights: weights, rows: rows) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let y = routedSwiGLUExperts(x, gate: gate, up: up, down: down, weights: weights, rows: rows)
        #expect(Self.allFinite(y))
        sum(mul(y, probe)).backward()
        let result = finiteDifferenceCheck([("x", x), ("gate", gate), ("up", up), ("down", down), ("weights", weights)],
                                           step: 1e-2, value: objective)
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        // A token no expert takes gets no gradient; one without weights counts each expert once.
        let plain = routedSwiGLUExperts(x, gate: gate, up: up, down: down, weights: nil, rows: [[0], [0, 1], []])
        #expect(plain.scalars[(2 * h)..<(6 * h)].allSatisfy { $0 == 0 })
    }

    @Test func gradientsReachTheRouterThroughProbabilityRouting() throws {
        let model = try Self.tinyLlama()
        try MoEfication.apply(to: model, sequences: Self.sequences(8, length: 20, seed: 2), options: Self.options(experts: 4, topK: 2))
        let block = try #require(model.moeBlocks.first)
        block.combine = .probability
        block.routerWeight.requiringGrad()
        block.routerBias.requiringGrad()
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
        // Most entries are checked (a selection flip is rare), and the router really gets a gradient.
        #expect(result.kinks < 30, "\(result.kinks) of 180 entries skipped as kinks")
        #expect(block.routerWeight.grad?.scalars.contains { $0 != 0 } == true)
    }

    @Test func statisticsCountLoadEntropyAndAgreement() throws {
        let model = try Self.tinyLlama()
        try MoEfication.apply(to: model, sequences: Self.sequences(12, length: 20, seed: 1), options: Self.options(experts: 4, topK: 2))
        for b in model.moeBlocks { b.checksAgreement = true }
        _ = try withNoGrad { try model.logits(try TokenBatch(sequences: [Array(0..<20).map(Int32.init)])) }
        let stats = model.moeRouterStatistics
        #expect(stats.count == 2)
        for s in stats {
            #expect(s.tokens == 20 && s.forwardPasses == 1)
            #expect(s.dispatchedTokens.reduce(0, +) == 40)
            #expect(abs(s.load.reduce(0, +) - 1) < 1e-9)
            #expect(s.meanEntropy > 0 && s.meanEntropy <= log(4.0) + 1e-6)
            #expect(s.agreementTokens == 20 && (0...1).contains(s.topKAgreement))
            #expect(s.summary["top_k_agreement"] != nil)
        }
        // The block's importance (expert GEMMs) is the one fitted on (dense activations, re-ordered).
        let block = model.moeBlocks[0], layer = model.layers[0]
        var rng = GraftRNG(seed: 8)
        let x = Tensor.randomNormal([6, 16], std: 1, rng: &rng)
        let a = withNoGrad { swiglu(layer.gateProj.forward(x), layer.upProj.forward(x)) }
        let reference = MoEfication.expertImportance(activations: a, partition: block.partition, sizes: [Int](repeating: 6, count: 4),
                                                     neuronNorms: block.neuronNorms)
        let err = worstOf(zip(block.expertImportance(x).scalars, reference.scalars).map { abs($0 - $1) / max(1, abs($1)) }, empty: .nan)
        #expect(err <= 1e-5, "importance differs by \(err)")
        model.resetMoERouterStatistics()
        #expect(model.moeRouterStatistics.allSatisfy { $0.tokens == 0 })
        #expect(throws: GraftError.self) { try model.setMoETopK(5) }
    }

    @Test func saveAndLoadRoundTrip() throws {
        let model = try Self.tinyLlama()
        try MoEfication.apply(to: model, sequences: Self.sequences(12, length: 20, seed: 1), options: Self.options(experts: 4, topK: 2))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-moe-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try MoEBaseFormat.save(model: model, to: dir, extra: ["seed": 0])
        let reloaded = try Self.tinyLlama()
        try MoEBaseFormat.load(into: reloaded, from: dir)
        for (a, b) in zip(model.moeBlocks, reloaded.moeBlocks) {
            #expect(a.partition == b.partition && a.topK == b.topK)
            #expect(a.routerWeight.scalars == b.routerWeight.scalars && a.routerBias.scalars == b.routerBias.scalars)
            #expect(a.gateWeight.scalars == b.gateWeight.scalars && a.downWeight.scalars == b.downWeight.scalars)
        }
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        #expect(try withNoGrad { try model.logits(batch).scalars } == withNoGrad { try reloaded.logits(batch).scalars })
        // A config that does not fit the model is refused, naming the field.
        let path = dir + "/" + MoEBaseFormat.configName
        var config = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        config["intermediate_size"] = 48
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: path))
        let error = try #require(throws: GraftError.self) { try MoEBaseFormat.load(into: try Self.tinyLlama(), from: dir) }
        #expect(error.message.contains("intermediate_size"))
    }

    /// Adapters on the dense MLP projections an MoE block replaces would silently stop applying: refused both ways.
    @Test func adaptersOnReplacedProjectionsAreRefused() throws {
        let model = try Self.tinyLlama()
        let adapted = AdaptedModel(root: model)
        try adapted.addAdapter("mlp", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["gate_proj"]], source: "mlp"))
        #expect(throws: GraftError.self) {
            try MoEfication.apply(to: model, sequences: Self.sequences(8, length: 20, seed: 1), options: Self.options(experts: 4, topK: 2))
        }
        #expect(model.moeBlocks.isEmpty, "a refused MoE-fication leaves the model dense")
        try adapted.deleteAdapter("mlp")
        try MoEfication.apply(to: model, sequences: Self.sequences(8, length: 20, seed: 1), options: Self.options(experts: 4, topK: 2))
        do {
            try adapted.addAdapter("mlp", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["down_proj"]], source: "mlp"))
            Issue.record("an adapter on a replaced down_proj was accepted")
        } catch let e as GraftError {
            #expect(e.message.contains("MoE block") && e.message.contains("down_proj"), "\(e.message)")
        }
        try adapted.addAdapter("attn", config: AdapterConfig(json: ["peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]], source: "attn"))
    }

    @Test func greedyGenerationAtKEqualsEMatchesTheDenseModel() throws {
        let model = try Self.tinyLlama()
        let parameters = GenerationParameters(maxNewTokens: 12, temperature: 0, stopTokens: [])
        let prompt: [Int32] = [4, 8, 15, 16, 23]
        let dense = try model.generate(prompt: prompt, parameters: parameters)
        try MoEfication.apply(to: model, sequences: Self.sequences(12, length: 20, seed: 1), options: Self.options(experts: 4, topK: 4))
        let routed = try model.generate(prompt: prompt, parameters: parameters)
        #expect(routed == dense)
        try model.setMoETopK(1)
        let sparse = try model.generate(prompt: prompt, parameters: parameters)
        #expect(sparse.count == 12 && sparse.allSatisfy { (0..<32).contains($0) })
    }
}
