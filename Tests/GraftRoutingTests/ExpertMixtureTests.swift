import Foundation
import Testing
@testable import Graft
@testable import GraftRouting
import GraftTestSupport

/// Mixtures of LoRA experts: gradients, routing decisions, capacity, auxiliary losses, statistics.
@Suite(.serialized) struct ExpertMixtureTests {
    static let inF = 5, outF = 4, rank = 2, experts = 3, tokens = 6

    static func layer(_ mode: ExpertRoutingMode, capacity: Float? = nil, topK: Int = 2, seed: UInt64 = 1) -> (LoRAMixtureLayer, Linear) {
        var rng = GraftRNG(seed: seed)
        let lin = Linear(weight: Tensor.randomNormal([outF, inF], std: 0.3, rng: &rng), bias: nil)
        var o = MixtureOptions()
        o.mode = mode
        o.topK = topK
        o.capacityFactor = capacity
        let l = LoRAMixtureLayer(base: lin, path: "test", experts: experts, rank: rank, alpha: 4, options: o, state: AdapterState(seed: seed))
        return (l, lin)
    }

    static func random(_ n: Int, _ rng: inout GraftRNG, scale: Double = 1) -> [Double] {
        (0..<n).map { _ in scale * Double(rng.nextNormal()) }
    }

    /// Float64 reference of the mixture delta with the routing decided from its own probabilities.
    static func reference(_ v: [[Double]], mode: ExpertRoutingMode, topK: Int, scaling: Double) -> [Double] {
        let x = v[0], w = v[1], a = v[2], b = v[3]
        let T = tokens, E = experts, r = rank
        var out = [Double](repeating: 0, count: T * outF)
        for t in 0..<T {
            var logits = [Double](repeating: 0, count: E)
            for e in 0..<E { for i in 0..<inF { logits[e] += w[e * inF + i] * x[t * inF + i] } }
            let m = logits.max() ?? 0
            let ex = logits.map { Foundation.exp($0 - m) }
            let z = ex.reduce(0, +)
            var g = ex.map { $0 / z }
            if mode == .topK {
                let top = Set((0..<E).sorted { g[$0] > g[$1] }.prefix(topK))
                let s = top.reduce(0) { $0 + g[$1] }
                g = (0..<E).map { top.contains($0) ? g[$0] / s : 0 }
            }
            for e in 0..<E where g[e] != 0 {
                var h = [Double](repeating: 0, count: r)
                for j in 0..<r { for i in 0..<inF { h[j] += a[(e * r + j) * inF + i] * x[t * inF + i] } }
                for o in 0..<outF {
                    var s = 0.0
                    for j in 0..<r { s += b[(e * outF + o) * r + j] * h[j] }
                    out[t * outF + o] += scaling * g[e] * s
                }
            }
        }
        return out
    }

    func check(_ mode: ExpertRoutingMode) {
        let (l, lin) = Self.layer(mode)
        var rng = GraftRNG(seed: 5)
        let T = Self.tokens, E = Self.experts, r = Self.rank
        let inputs = [Self.random(T * Self.inF, &rng), Self.random(E * Self.inF, &rng),
                      Self.random(E * r * Self.inF, &rng, scale: 0.5), Self.random(E * Self.outF * r, &rng, scale: 0.5)]
        var gc = GradientCheck()
        gc.gradientTolerance = 2e-3
        gc.run("LORA_MOE \(mode.rawValue)", inputs: inputs,
               shapes: [[T, Self.inF], [E, Self.inF], [E, r, Self.inF], [E, Self.outF, r]], trainable: [true, true, true, true],
               op: { t in l.forward(input: t[0], baseOutput: Tensor(zeros: [T, Self.outF]), layer: lin) },
               reference: { Self.reference($0, mode: mode, topK: 2, scaling: Double(l.scaling)) },
               bound: [nil, l.router, l.loraA, l.loraB])
    }

    @Test func softMixtureGradientsMatchFiniteDifferences() { check(.soft) }

    @Test func topKMixtureGradientsMatchFiniteDifferences() { check(.topK) }

    /// The fused routed op alone with a fixed sparse routing: gradients for x, A, B and the gates.
    @Test func routedExpertsOpGradients() {
        let T = 5, inF = 4, outF = 3, r = 2, E = 3
        let rows: [[Int32]?] = [[0, 2, 4], nil, [1]]
        var rng = GraftRNG(seed: 9)
        let inputs = [Self.random(T * inF, &rng), Self.random(E * r * inF, &rng), Self.random(E * outF * r, &rng), Self.random(T * E, &rng)]
        GradientCheck().run("routedLoRAExperts", inputs: inputs, shapes: [[T, inF], [E, r, inF], [E, outF, r], [T, E]],
                            trainable: [true, true, true, true],
                            op: { t in routedLoRAExperts(t[0], a: t[1], b: t[2], gates: t[3], rows: rows, scaling: 0.5) },
                            reference: { v in
            var out = [Double](repeating: 0, count: T * outF)
            for e in 0..<E {
                for t in rows[e].map({ $0.map(Int.init) }) ?? Array(0..<T) {
                    for o in 0..<outF {
                        var s = 0.0
                        for j in 0..<r {
                            var h = 0.0
                            for i in 0..<inF { h += v[1][(e * r + j) * inF + i] * v[0][t * inF + i] }
                            s += v[2][(e * outF + o) * r + j] * h
                        }
                        out[t * outF + o] += 0.5 * v[3][t * E + e] * s
                    }
                }
            }
            return out
        })
    }

    /// Six tokens that all pick expert 0 with top-1 and capacity factor 1: capacity ⌈1·6·1/2⌉ = 3, so tokens
    /// 3, 4, 5 overflow, are counted, and get no update from it.
    @Test func capacityOverflowDropsLateTokens() {
        var rng = GraftRNG(seed: 2)
        let lin = Linear(weight: Tensor.randomNormal([3, 2], std: 0.5, rng: &rng), bias: nil)
        var o = MixtureOptions()
        o.mode = .topK
        o.topK = 1
        o.capacityFactor = 1
        let l = LoRAMixtureLayer(base: lin, path: "p", experts: 2, rank: 1, alpha: 1, options: o, state: AdapterState(seed: 1))
        l.router.pointer.update(from: [5, 5, -5, -5], count: 4)  // expert 0 wins for positive inputs
        for i in 0..<l.loraB.count { l.loraB.pointer[i] = 1 }
        for i in 0..<l.loraA.count { l.loraA.pointer[i] = 1 }
        let x = Tensor(shape: [6, 2], values: (0..<12).map { Float($0 % 2 + 1) })
        let base = Tensor(zeros: [6, 3])
        let y = withNoGrad { l.forward(input: x, baseOutput: base, layer: lin) }
        let plan = l.lastPlan
        #expect(plan?.capacity == 3)
        #expect(plan?.overflow == [3, 0])
        #expect(plan?.rows[0] == [0, 1, 2])
        #expect(l.statistics.overflowCount == 3)
        for t in 0..<6 {
            let row = (0..<3).map { y.pointer[t * 3 + $0] }
            if t < 3 { #expect(row.allSatisfy { abs($0 - 3) < 1e-4 }, "token \(t): \(row)") }  // 1·(1+2)·1 · gate 1
            else { #expect(row.allSatisfy { $0 == 0 }, "overflow token \(t) got \(row)") }
        }
    }

    @Test func topPPicksTheSmallestSetReachingP() {
        let probs: [Float] = [0.1, 0.5, 0.15, 0.25]
        probs.withUnsafeBufferPointer { p in
            #expect(RoutePlan.topPSet(p, p: 0.4) == [1])
            #expect(RoutePlan.topPSet(p, p: 0.5) == [1])
            #expect(RoutePlan.topPSet(p, p: 0.7) == [1, 3])
            #expect(RoutePlan.topPSet(p, p: 0.75) == [1, 3])
            #expect(RoutePlan.topPSet(p, p: 0.8) == [1, 3, 2])
            #expect(RoutePlan.topPSet(p, p: 1.0) == [1, 3, 2, 0])
            let plan = RoutePlan.make(probs: p, tokens: 1, experts: 4, mode: .topP, topK: 0, topP: 0.7, capacityFactor: nil)
            #expect(plan.selected == [0, 1, 0, 1])
            #expect(plan.rows.map { $0?.count } == [0, 1, 0, 1])
        }
    }

    @Test func auxiliaryLossesMatchHandComputations() {
        // Load balancing: top-1 picks expert 0 for both tokens: f = (1, 0), P = (0.7, 0.3): 2·(1·0.7) = 1.4.
        let probs = Tensor(shape: [2, 2], values: [0.8, 0.2, 0.6, 0.4])
        let plan = RoutePlan.make(probs: UnsafeBufferPointer(probs.buffer), tokens: 2, experts: 2, mode: .topK, topK: 1,
                                  topP: 1, capacityFactor: nil)
        #expect(abs(MixtureLosses.loadBalancing(probs: probs, plan: plan).item - 1.4) < 1e-6)
        // Soft mode counts the argmax: the same here.
        let soft = RoutePlan.make(probs: UnsafeBufferPointer(probs.buffer), tokens: 2, experts: 2, mode: .soft, topK: 1, topP: 1, capacityFactor: nil)
        #expect(abs(MixtureLosses.loadBalancing(probs: probs, plan: soft).item - 1.4) < 1e-6)
        // z-loss: mean of logsumexp² over tokens.
        let logits = Tensor(shape: [2, 2], values: [1, 2, 0, 0])
        let l1 = Foundation.log(Foundation.exp(1.0) + Foundation.exp(2.0)), l2 = Foundation.log(2.0)
        #expect(abs(Double(MixtureLosses.zLoss(logits: logits).item) - (l1 * l1 + l2 * l2) / 2) < 1e-5)
        // Contrastive: one token x = (1, 1), expert outputs o0 = (1, 0) and o1 = (1, 1): cos = 1/√2, and each of
        // the two terms is log(1 + e^{(cos − 1)/τ}).
        let a = Tensor(shape: [2, 1, 2], values: [1, 0, 0, 1])
        let b = Tensor(shape: [2, 2, 1], values: [1, 0, 1, 1])
        let x = Tensor(shape: [1, 2], values: [1, 1])
        let p2 = Tensor(shape: [1, 2], values: [0.5, 0.5])
        let both = RoutePlan.make(probs: UnsafeBufferPointer(p2.buffer), tokens: 1, experts: 2, mode: .soft, topK: 2, topP: 1, capacityFactor: nil)
        var rng = GraftRNG(seed: 1)
        let tau: Float = 0.5
        let c = MixtureLosses.contrastive(x: x, a: a, b: b, plan: both, temperature: tau, maxTokens: 8, rng: &rng)
        let expected = Foundation.log(1 + Foundation.exp((1 / 2.0.squareRoot() - 1) / Double(tau)))
        #expect(c != nil)
        #expect(abs(Double(c?.item ?? 0) - expected) < 1e-5, "contrastive \(c?.item ?? .nan) vs \(expected)")
    }

    @Test func auxiliaryLossGradientsMatchFiniteDifferences() {
        var rng = GraftRNG(seed: 4)
        let logits = Self.random(12, &rng)
        GradientCheck().run("z-loss", inputs: [logits], shapes: [[4, 3]], trainable: [true],
                            op: { MixtureLosses.zLoss(logits: $0[0]) },
                            reference: { v in
            var s = 0.0
            for t in 0..<4 {
                let row = v[0][(t * 3)..<(t * 3 + 3)]
                let m = row.max() ?? 0
                let l = m + Foundation.log(row.reduce(0) { $0 + Foundation.exp($1 - m) })
                s += l * l
            }
            return [s / 4]
        })
    }

    @Test func statisticsAreCollectedAndReset() throws {
        let (l, lin) = Self.layer(.topK, capacity: 1.0)
        var rng = GraftRNG(seed: 3)
        let x = Tensor.randomNormal([40, Self.inF], std: 1, rng: &rng)
        _ = withNoGrad { l.forward(input: x, baseOutput: Tensor(zeros: [40, Self.outF]), layer: lin) }
        let s = l.statistics
        #expect(s.tokens == 40 && s.forwardPasses == 1)
        #expect(abs(s.load.reduce(0, +) - 1) < 1e-6)
        #expect(s.meanEntropy > 0 && s.meanEntropy <= Foundation.log(Double(Self.experts)) + 1e-6)
        #expect(s.dispatchedTokens.reduce(0, +) + s.overflowCount == 40 * 2)
        print("router statistics (top-2, capacity 1.0, 40 tokens): load \(s.load.map { String(format: "%.3f", $0) }), token fraction \(s.tokenFraction.map { String(format: "%.3f", $0) }), entropy \(String(format: "%.3f", s.meanEntropy)), overflow \(s.overflow)")
    }

    /// MoLA: expert counts per layer; then a few SiRA training steps on MiniLM with every auxiliary loss lower
    /// the loss, and the model-level statistics API reports every layer.
    @Test func perLayerExpertsAndTrainingWithAuxiliaryLosses() throws {
        let (classifier, examples) = try RoutingFixtures.tweetClassification(16)
        let model = AdaptedModel(root: classifier, methods: .all)
        let json: [String: Any] = [
            "peft_type": "LORA_MOE", "r": 2, "lora_alpha": 4, "routing": "top_k", "top_k": 2, "capacity_factor": 1.0,
            "gate_dropout": 0.1, "experts_per_layer": [2, 3, 4, 2, 3, 4], "experts_pattern": ["layer.5.attention.self.value": 5],
            "load_balancing_loss_weight": 0.01, "router_z_loss_weight": 0.001, "contrastive_loss_weight": 0.01,
            "target_modules": ["query", "value"]]
        let a = try model.addAdapter("moe", config: AdapterConfig(json: json, source: "test"), seed: 1)
        let counts = a.layers.compactMap { ($0.adapter as? LoRAMixtureLayer)?.experts }
        #expect(counts == [2, 2, 3, 3, 4, 4, 2, 2, 3, 3, 4, 5])
        // Config errors name the key and value.
        #expect(throws: GraftError.self) { try model.addAdapter("bad", config: AdapterConfig(json: ["peft_type": "LORA_MOE", "routing": "sparse", "target_modules": ["query"]], source: "t")) }
        let config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 5e-3)
        let trainer = try Trainer(model: model, adapterName: "moe", objective: SequenceClassificationObjective(model: classifier), config: config)
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        for _ in 0..<8 {
            _ = try trainer.accumulate(batch)
            try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
        #expect(after < before - 1e-3, "loss \(before) -> \(after)")
        let stats = model.routerStatistics()
        #expect(stats.count == 12)
        #expect(try model.routerStatisticsJSON().contains("mean_entropy"))
        model.resetRouterStatistics()
        #expect(model.routerStatistics().allSatisfy { $0.stats.tokens == 0 })
        // Save and load round trip (per-layer expert counts come back from adapter_config.json).
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-moe-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let logits = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        try model.saveAdapter("moe", directory: dir)
        try model.deleteAdapter("moe")
        let loaded = try model.loadAdapter(directory: dir, name: "moe2")
        #expect(loaded.layers.compactMap { ($0.adapter as? LoRAMixtureLayer)?.experts } == counts)
        let again = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        let diff = worstOf(zip(logits, again).map { abs($0 - $1) }, empty: 1)
        #expect(diff < 1e-6, "reloaded adapter differs by \(diff)")
        print("SiRA + aux losses, 8 steps on 16 tweets: loss \(before) -> \(after)")
    }
}

/// The full method table (GraftAdapters' methods plus the mixtures) has a PEFT parity record for every method.
@Suite struct MethodTableParityRecordTests {
    @Test func everyMethodHasARecord() {
        let missing = AdapterMethodTable.all.knownTypes.filter { PEFTParity.records[$0] == nil }
        #expect(missing.isEmpty, "methods without a PEFT parity record: \(missing)")
        #expect(PEFTParity.record(for: "LORA_MOE") == .noPEFTCounterpart)
    }

    /// Python reaches every PEFT method through its own config class, generated from PEFT by
    /// scripts/gen-python-configs: a method added to the table without regenerating fails here.
    @Test func everyPEFTMethodHasAPythonConfigClass() throws {
        let package = URL(fileURLWithPath: Assets.fixture("../../bindings/python/graft/peft_configs")).standardized
        let modules = try FileManager.default.contentsOfDirectory(at: package, includingPropertiesForKeys: nil)
            .filter { $0.pathExtension == "py" }
        #expect(modules.count > 2, "no generated modules in \(package.path)")
        let text = try modules.map { try String(contentsOf: $0, encoding: .utf8) }.joined(separator: "\n")
        let missing = AdapterMethodTable.all.knownTypes.filter {
            PEFTParity.record(for: $0) != .noPEFTCounterpart && !text.contains("PEFT_TYPE = \"\($0)\"")
        }
        #expect(missing.isEmpty, "no Python config class for \(missing): run scripts/gen-python-configs in the bench environment")
    }
}
