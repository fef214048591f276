import Foundation
import Testing
import Graft
import GraftTestSupport

/// ESFT on a tiny random MoE base (MoEfication of a 2-layer Llama): the selection follows the paper's criteria on
/// a planted routing distribution, gradients through the routed block, only the selected experts train, and the
/// saved tuned experts load back exactly.
@Suite struct ESFTTests {
    /// A tiny MoE base: 2 layers, E = 4 experts of 6 neurons, top-2.
    static func moeBase(topK: Int = 2) throws -> LlamaModel {
        let model = try MoEficationTests.tinyLlama()
        try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1),
                              options: MoEficationTests.options(experts: 4, topK: topK))
        return model
    }

    /// Routes every token of layer `i` by the router bias alone (zero router weight): the same probabilities for
    /// every token, `softmax(bias)`.
    static func plant(_ model: LlamaModel, biases: [[Float]]) {
        for (b, bias) in zip(model.moeBlocks, biases) {
            b.routerWeight.pointer.update(repeating: 0, count: b.routerWeight.count)
            b.routerBias.pointer.update(from: bias, count: bias.count)
        }
    }

    static func softmax(_ v: [Float]) -> [Double] {
        let m = v.max() ?? 0
        let e = v.map { exp(Double($0 - m)) }
        let s = e.reduce(0, +)
        return e.map { $0 / s }
    }

    static func config(_ experts: [String: [Int]]) throws -> AdapterConfig {
        try AdapterConfig(json: ["peft_type": "ESFT", "score_function": "token", "top_p": 0.5, "experts": experts], source: "esft")
    }

    @Test func selectionFollowsTheCumulativeShareCriterion() throws {
        // The shortest prefix by decreasing score that reaches p; ties go to the lower index.
        #expect(ESFT.select(scores: [0.1, 0.4, 0.3, 0.2], topP: 0.5) == [1, 2])
        #expect(ESFT.select(scores: [0.1, 0.4, 0.3, 0.2], topP: 0.4) == [1])
        #expect(ESFT.select(scores: [0.25, 0.25, 0.25, 0.25], topP: 0.3) == [0, 1])
        #expect(ESFT.select(scores: [0.05, 0.05, 0, 0], topP: 0.2) == [0, 1, 2, 3], "an unreachable p takes every expert")

        // Planted routing: layer 0 sends every token to experts 2 and 3, layer 1 to experts 0 and 1.
        let model = try Self.moeBase()
        let biases: [[Float]] = [[0, 1, 5, 3], [4, 2, -1, 0]]
        Self.plant(model, biases: biases)
        let sequences = MoEficationTests.sequences(5, length: 9, seed: 3)
        let token = try ESFT.scores(model: model, sequences: sequences, score: .token)
        let gate = try ESFT.scores(model: model, sequences: sequences, score: .gate)
        let p0 = Self.softmax(biases[0]), p1 = Self.softmax(biases[1])
        let expectedToken: [[Double]] = [[0, 0, 0.5, 0.5], [0.5, 0.5, 0, 0]]
        let expectedGate: [[Double]] = [[0, 0, p0[2], p0[3]], [p1[0], p1[1], 0, 0]]
        let err = worstOf(zip(token + gate, expectedToken + expectedGate).flatMap { zip($0, $1).map { abs($0 - $1) } }, empty: .nan)
        print(String(format: "ESFT planted routing: scores within %.2e of the criteria (gate scores %.3f/%.3f, %.3f/%.3f)",
                     err, gate[0][2], gate[0][3], gate[1][0], gate[1][1]))
        #expect(err <= 1e-6, "scores differ from the planted criteria by \(err)")
        // Token criterion, p = 0.5: one expert of the two reaches it (the lower index on a tie).
        let config = try ESFT.configuration(model: model, sequences: sequences, score: .token, topP: 0.5)
        #expect(config["experts"] as? [String: [Int]] == ["0": [2], "1": [0]])
        // Gate criterion, p = 0.9: the top expert's probability (0.84, 0.84) does not reach it; the top two do.
        let gateConfig = try ESFT.configuration(model: model, sequences: sequences, score: .gate, topP: 0.9)
        #expect(gateConfig["experts"] as? [String: [Int]] == ["0": [2, 3], "1": [0, 1]])
        // The statistics API records the routed probability too, and a dense model is refused by name.
        #expect(model.moeRouterStatistics.allSatisfy { $0.tokens == 0 }, "scoring leaves the statistics reset")
        let dense = try MoEficationTests.tinyLlama()
        #expect(throws: GraftError.self) { try ESFT.scores(model: dense, sequences: sequences, score: .token) }
    }

    /// An MoE base of layer 1 only (upcycled): the selection is keyed by decoder layer, the adapter tunes that
    /// layer and leaves the dense layer 0 alone, and a selection naming the dense layer is refused by name.
    @Test func aBaseOfSomeLayersIsSelectedAndTunedByLayerIndex() throws {
        let model = try MoEficationTests.tinyLlama()
        var options = MoEUpcyclingOptions()
        options.experts = 2
        options.topK = 1
        options.layers = [1]
        _ = try MoEUpcycling.apply(to: model, options: options)
        let sequences = MoEficationTests.sequences(4, length: 9, seed: 5)
        let selected = try ESFT.configuration(model: model, sequences: sequences, score: .token, topP: 0.5)
        let experts = selected["experts"] as? [String: [Int]] ?? [:]
        #expect(Array(experts.keys) == ["1"] && experts["1"]?.isEmpty == false, "keyed by decoder layer: \(experts)")
        let adapted = AdaptedModel(root: model, methods: .all)
        let adapter = try adapted.addAdapter("esft", config: try Self.config(experts))
        #expect(adapter.modules.map(\.path) == ["model.layers.1"], "only the MoE layer: \(adapter.modules.map(\.path))")
        #expect(throws: GraftError.self) { try adapted.addAdapter("bad", config: try Self.config(["0": [0]])) }
    }

    @Test func aNewAdapterIsTheBaseAndGradientsMatchFiniteDifferences() throws {
        let model = try Self.moeBase()
        let adapted = AdaptedModel(root: model, methods: .all)
        let block = try #require(model.moeBlocks.first)
        var rng = GraftRNG(seed: 5)
        let x = Tensor.randomNormal([9, 16], std: 1, rng: &rng)
        let before = withNoGrad { block.forward(x) }
        let adapter = try adapted.addAdapter("esft", config: Self.config(["0": [1, 3], "1": [0]]))
        #expect(adapter.modules.map(\.path) == ["model.layers.0", "model.layers.1"])
        #expect(adapter.parameterCount == 3 * 3 * 6 * 16)
        let fresh = withNoGrad { block.forward(x) }
        let start = worstOf(zip(before.scalars, fresh.scalars).map { abs($0 - $1) }, empty: .nan)
        #expect(start <= 1e-6, "a new ESFT adapter changes the block by \(start)")

        // Gradients of the tuned experts and the input, through top-2 routing with probability weights (so the
        // routing weights reach the tuned experts too).
        block.combine = .probability
        let layer = try #require(adapter.modules.first?.adapter as? ESFTLayer)
        for t in [layer.tuned.gate, layer.tuned.up, layer.tuned.down] {
            for i in 0..<t.count { t.pointer[i] += 0.1 * rng.nextNormal() }
        }
        let xg = x.copy().requiringGrad()
        let probe = Tensor.randomNormal([9, 16], std: 1, rng: &rng)
        sum(mul(block.forward(xg), probe)).backward()
        #expect(block.gateWeight.grad == nil && block.routerWeight.grad == nil, "the base block is frozen")
        let result = finiteDifferenceCheck([("x", xg), ("gate", layer.tuned.gate), ("up", layer.tuned.up), ("down", layer.tuned.down)],
                                           step: 1e-2, skipKinks: true) {
            let y = withNoGrad { block.forward(xg) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        print("ESFT routed-block gradients: worst relative error \(result.worst), \(result.kinks) kinks skipped")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        #expect(layer.tuned.down.grad?.scalars.contains { $0 != 0 } == true)
    }

    @Test func onlyTheSelectedExpertsChangeAndTheSaveLoadsBackExactly() throws {
        let model = try Self.moeBase()
        let adapted = AdaptedModel(root: model, methods: .all)
        let adapter = try adapted.addAdapter("esft", config: Self.config(["0": [1, 3], "1": [2]]))
        let snapshot = model.namedParameters().map { ($0.name, $0.tensor.scalars) }
        let blockBefore = model.moeBlocks.map { [$0.gateWeight.scalars, $0.upWeight.scalars, $0.downWeight.scalars, $0.routerWeight.scalars] }
        let examples = MoEficationTests.sequences(6, length: 14, seed: 7).map {
            TokenizedExample(ids: $0, targets: Array($0.dropFirst()) + [-100])
        }
        let trainer = try Trainer(model: adapted, adapterName: "esft", objective: CausalLMObjective(model: model),
                                  config: .fullBatch(examples: examples.count, learningRate: 1e-2))
        let lossBefore = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        for _ in 0..<5 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let lossAfter = try trainer.evaluate(examples).loss
        print(String(format: "ESFT tiny MoE: loss %.4f -> %.4f in 5 steps (%d trainable)", lossBefore, lossAfter, adapter.parameterCount))
        #expect(lossBefore.isFinite && lossAfter < lossBefore - 1e-3)
        // Nothing of the model moved (its parameters, experts and routers included).
        for ((name, before), now) in zip(snapshot, model.namedParameters().map(\.tensor.scalars)) { #expect(before == now, "\(name) changed") }
        for (b, before) in zip(model.moeBlocks, blockBefore) {
            #expect([b.gateWeight.scalars, b.upWeight.scalars, b.downWeight.scalars, b.routerWeight.scalars] == before)
        }
        // Merged, the selected experts differ from the base and every other expert is bit-identical.
        try adapted.merge("esft")
        let selected = [[1, 3], [2]]
        let n = 6 * 16
        for (l, b) in model.moeBlocks.enumerated() {
            for (w, old) in zip([b.gateWeight, b.upWeight, b.downWeight], blockBefore[l]) {
                for e in 0..<4 {
                    let moved = (0..<n).contains { w.pointer[e * n + $0] != old[e * n + $0] }
                    #expect(moved == selected[l].contains(e), "layer \(l) expert \(e): moved = \(moved)")
                }
            }
        }
        try adapted.unmerge("esft")
        #expect(model.moeBlocks[0].gateWeight.scalars == blockBefore[0][0])

        // Save, load onto a fresh copy of the same MoE base: the same tensors and the same logits, bit for bit.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-esft-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try adapted.saveAdapter("esft", directory: dir)
        let reloaded = try Self.moeBase()
        let adapted2 = AdaptedModel(root: reloaded, methods: .all)
        let loaded = try adapted2.loadAdapter(directory: dir, name: "esft")
        #expect(loaded.peftStateDict.map(\.key) == adapter.peftStateDict.map(\.key))
        for (a, b) in zip(adapter.peftStateDict, loaded.peftStateDict) { #expect(a.tensor.scalars == b.tensor.scalars, "\(a.key)") }
        let tokens = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        #expect(try withNoGrad { try model.logits(tokens).scalars } == withNoGrad { try reloaded.logits(tokens).scalars })
        // Generation runs with the tuned experts.
        let out = try reloaded.generate(prompt: [4, 8, 15], parameters: GenerationParameters(maxNewTokens: 6, temperature: 0, stopTokens: []))
        #expect(out.count == 6 && out.allSatisfy { (0..<32).contains($0) })

        // A base with another expert count, a dense model, or a layer the model lacks are refused by name.
        let other = try MoEficationTests.tinyLlama()
        try MoEfication.apply(to: other, sequences: MoEficationTests.sequences(12, length: 20, seed: 1),
                              options: MoEficationTests.options(experts: 2, topK: 1))
        let e1 = try #require(throws: GraftError.self) { try AdaptedModel(root: other, methods: .all).loadAdapter(directory: dir) }
        #expect(e1.message.contains("num_experts") || e1.message.contains("experts"), "\(e1.message)")
        let e2 = try #require(throws: GraftError.self) {
            try AdaptedModel(root: try MoEficationTests.tinyLlama(), methods: .all).loadAdapter(directory: dir)
        }
        #expect(e2.message.contains("MoE"), "\(e2.message)")
        let e3 = try #require(throws: GraftError.self) {
            try AdaptedModel(root: try Self.moeBase(), methods: .all).addAdapter("x", config: Self.config(["5": [0]]))
        }
        #expect(e3.message.contains("layer 5"), "\(e3.message)")
        for bad in [["0": [1, 1]], ["x": [0]], ["0": [-1]]] as [[String: [Int]]] {
            let e = try #require(throws: GraftError.self) {
                try AdaptedModel(root: try Self.moeBase(), methods: .all).addAdapter("x", config: Self.config(bad))
            }
            #expect(e.message.contains("'experts'"), "\(e.message)")
        }
    }
}
