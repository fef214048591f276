import Foundation
import Testing
import Graft
import GraftTestSupport

/// S'MoRE, hierarchical residual low-rank experts: the layer against an explicit tree walk computed here, gradients
/// through both routing levels, per-level router statistics, cached generation, a MiniLM fine-tune and the
/// PEFT-layout round trip.
@Suite struct SMoRETests {
    static func config(_ extra: [String: Any] = [:]) throws -> AdapterConfig {
        var json: [String: Any] = ["peft_type": "SMORE", "r": 3, "lora_alpha": 6, "num_levels": 2, "num_experts": [3, 4],
                                   "top_k": 2, "target_modules": ["v_proj", "down_proj"]]
        json.merge(extra) { _, new in new }
        return try AdapterConfig(json: json, source: "smore")
    }

    /// Softmax of `logits` and its top-`k` indices (ties by index).
    static func topK(_ logits: [Float], _ k: Int) -> (probs: [Float], picked: [Int]) {
        let top = logits.reduce(-Float.infinity) { worse($0, $1) }
        let e = logits.map { exp($0 - top) }, total = e.reduce(0, +)
        let p = e.map { $0 / total }
        return (p, Array(p.indices.sorted { p[$0] > p[$1] || (p[$0] == p[$1] && $0 < $1) }.prefix(k)))
    }

    @Test func layerIsTheTreeWalkAndGradientsMatchFiniteDifferences() throws {
        let model = try MoEficationTests.tinyLlama()
        let batch = try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6]])
        let baseLogits = try withNoGrad { try model.logits(batch) }.scalars
        let adapted = AdaptedModel(root: model, methods: .all)
        let a = try adapted.addAdapter("smore", config: Self.config(), seed: 4)
        #expect(a.layers.count == 4)
        #expect(try withNoGrad { try model.logits(batch) }.scalars == baseLogits, "B = 0 leaves the model as it was")
        var rng = GraftRNG(seed: 9)
        for t in a.parameters { for i in 0..<t.count { t.pointer[i] += 0.3 * rng.nextNormal() } }

        // One v_proj layer against the tree: h(j) = z_j + Σ_{c ∈ top-2 of softmax(R_1 z_j)} g_c P z_c,
        // out = W x + b + (α/r) B Σ_{j ∈ top-2 of softmax(R_0 x)} g_j h(j).
        let site = try #require(a.layers.first { $0.path.hasSuffix("0.self_attn.v_proj") })
        let layer = try #require(site.adapter as? SMoRELayer)
        let x = Tensor.randomNormal([5, site.linear.inFeatures], std: 1, rng: &rng)
        adapted.resetRouterStatistics()
        let y = withNoGrad { site.linear.forward(x) }.scalars
        let inF = site.linear.inFeatures, outF = site.linear.outFeatures, r = 3
        let w = site.linear.weight.scalars, bias = site.linear.bias?.scalars ?? [Float](repeating: 0, count: outF)
        let r0 = layer.routers[0].scalars, r1 = layer.routers[1].scalars, a0 = layer.down[0].scalars, a1 = layer.down[1].scalars
        let p = layer.propagation[0].scalars, b = layer.up.scalars
        func features(_ a: [Float], _ j: Int, _ row: [Float]) -> [Float] {
            (0..<r).map { k in (0..<inF).reduce(Float(0)) { $0 + a[(j * r + k) * inF + $1] * row[$1] } }
        }
        var worst: Float = 0
        for t in 0..<5 {
            let row = Array(x.scalars[(t * inF)..<((t + 1) * inF)])
            let root = Self.topK((0..<3).map { j in (0..<inF).reduce(Float(0)) { $0 + r0[j * inF + $1] * row[$1] } }, 2)
            var total = [Float](repeating: 0, count: r)
            for j in root.picked {
                var h = features(a0, j, row)
                let zj = h
                let child = Self.topK((0..<4).map { c in (0..<r).reduce(Float(0)) { $0 + r1[c * r + $1] * zj[$1] } }, 2)
                for c in child.picked {
                    let zc = features(a1, c, row)
                    for i in 0..<r { h[i] += child.probs[c] * (0..<r).reduce(Float(0)) { $0 + p[i * r + $1] * zc[$1] } }
                }
                for i in 0..<r { total[i] += root.probs[j] * h[i] }
            }
            for o in 0..<outF {
                let base = bias[o] + (0..<inF).reduce(Float(0)) { $0 + w[o * inF + $1] * row[$1] }
                let v = base + 2 * (0..<r).reduce(Float(0)) { $0 + b[o * r + $1] * total[$1] }
                worst = worse(worst, abs(v - y[t * outF + o]))
            }
        }
        print("S'MoRE layer vs the explicit tree walk (2 levels, 3 and 4 residuals, top-2 each): max |Δ| = \(worst)")
        #expect(worst <= 1e-4, "layer output differs from the tree walk by \(worst)")
        // Statistics: level 0 routes 5 tokens to 2 roots each; level 1 routes the 10 (token, root) pairs.
        let stats = layer.routerStatistics
        #expect(stats.count == 2 && stats[0].tokens == 5 && stats[0].dispatchedTokens.reduce(0, +) == 10)
        #expect(stats[1].tokens == 10 && stats[1].dispatchedTokens.reduce(0, +) == 20 && stats[1].path.hasSuffix(".smore.level1"))
        #expect(abs(stats[1].load.reduce(0, +) - 1) < 1e-9 && stats[1].meanEntropy > 0 && stats[1].meanEntropy <= log(4.0) + 1e-6)

        // Gradients of layer 0's routers, residuals, propagation and B through both routing levels.
        let probe = Tensor.randomNormal([1, 8, 32], std: 1, rng: &rng)
        sum(mul(try model.logits(batch), probe)).backward()
        let params: [(key: String, tensor: Tensor)] = a.layers.filter { $0.path.hasPrefix("model.layers.0.") }
            .flatMap { l in (l.adapter as? SMoRELayer)?.namedParameters.map { (key: "\(l.path).\($0.name)", tensor: $0.tensor) } ?? [] }
        #expect(params.count == 12)
        let checked = params.reduce(0) { $0 + $1.tensor.count }
        let result = try finiteDifferenceCheck(params, step: 2e-3, skipKinks: true) { try RoutingFixtures.probed(model, batch, probe) }
        print("S'MoRE gradients (routers, residuals, propagation, B; layer 0): worst relative error \(result.worst), \(result.kinks) of \(checked) entries skipped as kinks")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst)")
        #expect(result.kinks * 10 < checked, "\(result.kinks) of \(checked) entries skipped as kinks")
        #expect(layer.routers[1].grad?.scalars.contains { $0 != 0 } == true, "the child router gets a gradient")

        // Cached generation routes each new token as a full pass does.
        let generated = try model.generate(prompt: [4, 8, 15, 16], parameters: GenerationParameters(maxNewTokens: 4, temperature: 0, stopTokens: []))
        #expect(generated == (try RoutingFixtures.greedyByFullPasses(model, prompt: [4, 8, 15, 16], steps: 4)))
        #expect(throws: GraftError.self) { try adapted.merge("smore") }
        for bad: [String: Any] in [["num_levels": 0], ["num_experts": [3]], ["top_k": 0], ["r": 0], ["lora_dropout": 0.1]] {
            #expect(throws: GraftError.self) { try adapted.addAdapter("bad", config: Self.config(bad)) }
        }
    }

    @Test func fineTunesMiniLMAndLoadsBackExactly() throws {
        let (classifier, examples) = try RoutingFixtures.tweetClassification(16)
        let model = AdaptedModel(root: classifier, methods: .all)
        let json: [String: Any] = ["peft_type": "SMORE", "r": 4, "lora_alpha": 8, "num_levels": 2, "num_experts": [4, 4], "top_k": [2, 2],
                                   "target_modules": ["query", "value"], "modules_to_save": ["classifier"]]
        let a = try model.addAdapter("smore", config: AdapterConfig(json: json, source: "smore"), seed: 1)
        let trainer = try Trainer(model: model, adapterName: "smore", objective: SequenceClassificationObjective(model: classifier),
                                  config: .fullBatch(examples: examples.count, learningRate: 5e-3))
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples), padded: false)
        model.resetRouterStatistics()
        for _ in 0..<8 {
            _ = try trainer.accumulate(batch)
            _ = try trainer.optimizerStep(totalSteps: 1 << 20)
        }
        let after = try trainer.evaluate(examples).loss
        let stats = model.routerStatistics(adapter: "smore")
        let entropy = stats.filter { $0.stats.path.hasSuffix("level1") }.map(\.stats.meanEntropy)
        print(String(format: "S'MoRE on MiniLM (2 levels of 4 rank-4 residuals, top-2, query+value + classifier, %d trainable): loss %.4f -> %.4f in 8 steps on 16 tweets; level-1 mean entropy %.3f",
                     a.parameterCount, before, after, entropy.reduce(0, +) / Double(max(entropy.count, 1))))
        #expect(before.isFinite && after < before - 1e-3, "loss \(before) -> \(after)")
        #expect(stats.count == 24 && stats.allSatisfy { $0.stats.tokens > 0 })
        #expect(try model.routerStatisticsJSON(adapter: "smore").contains("smore.level1"))

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-smore-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let logits = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        try model.saveAdapter("smore", directory: dir)
        let saved = try String(contentsOfFile: dir + "/adapter_config.json", encoding: .utf8)
        #expect(saved.contains("SMORE") && FileManager.default.fileExists(atPath: dir + "/adapter_model.safetensors"))
        try model.deleteAdapter("smore")
        try model.loadAdapter(directory: dir, name: "again")
        let again = try withNoGrad { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }.scalars
        let diff = worstOf(zip(logits, again).map { abs($0 - $1) }, empty: .nan)
        print("S'MoRE save/load round trip: max |Δ logits| = \(diff)")
        #expect(diff == 0, "the reloaded adapter gives other logits (max |Δ| \(diff))")
    }
}
