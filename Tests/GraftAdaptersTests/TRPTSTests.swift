import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// TR-PTS's parameter half: the Fisher information its warm-up probes gather equals a brute-force Fisher computed
/// here in closed form, the allocation picks the top entries layer by layer within a budget kept exactly,
/// finite-difference gradients, merge / unmerge, and a save → load round trip in PEFT's file layout.
@Suite struct TRPTSTests {
    /// Two stacked Linears, 6×8 then 5×6 (with biases), under `a.proj` and `b.proj`.
    static func toy() -> (ModuleList, Linear, Linear) {
        var rng = GraftRNG(seed: 21)
        let first = Linear(weight: Tensor.randomNormal([6, 8], std: 0.5, rng: &rng), bias: Tensor.randomNormal([6], rng: &rng))
        let second = Linear(weight: Tensor.randomNormal([5, 6], std: 0.5, rng: &rng), bias: Tensor.randomNormal([5], rng: &rng))
        let root = ModuleList(typeName: "Toy", [("a", ModuleList(typeName: "A", [("proj", first)])),
                                                 ("b", ModuleList(typeName: "B", [("proj", second)]))])
        return (root, first, second)
    }

    /// Batches `(x [3, 8], w [3, 5])` of the objective `L = Σ w ⊙ second(first(x))`.
    static func batches(_ n: Int) -> [(x: [Double], w: [Double])] {
        (0..<n).map { (randomValues(24, seed: UInt64(40 + $0)), randomValues(15, seed: UInt64(80 + $0))) }
    }

    /// The Fisher information Σ_b (∂L_b/∂W)² of both weights, in closed form: ∂L/∂W₂ = Σ_t w_t h_tᵀ with
    /// h = W₁x + b₁, and ∂L/∂W₁ = Σ_t (W₂ᵀ w_t) x_tᵀ.
    static func bruteForceFisher(_ first: Linear, _ second: Linear, _ data: [(x: [Double], w: [Double])]) -> [[Double]] {
        let w1: [Double] = first.weight.scalars.map { Double($0) }
        let b1: [Double] = (first.bias?.scalars ?? []).map { Double($0) }
        let w2: [Double] = second.weight.scalars.map { Double($0) }
        var f1 = [Double](repeating: 0, count: 48), f2 = [Double](repeating: 0, count: 30)
        for (x, w) in data {
            var g1 = [Double](repeating: 0, count: 48), g2 = [Double](repeating: 0, count: 30)
            for t in 0..<3 {
                var h = [Double](repeating: 0, count: 6), back = [Double](repeating: 0, count: 6)
                for i in 0..<6 {
                    h[i] = b1[i]
                    for j in 0..<8 { h[i] += w1[i * 8 + j] * x[t * 8 + j] }
                    for o in 0..<5 { back[i] += w2[o * 6 + i] * w[t * 5 + o] }
                }
                for o in 0..<5 { for i in 0..<6 { g2[o * 6 + i] += w[t * 5 + o] * h[i] } }
                for i in 0..<6 { for j in 0..<8 { g1[i * 8 + j] += back[i] * x[t * 8 + j] } }
            }
            for i in 0..<48 { f1[i] += g1[i] * g1[i] }
            for i in 0..<30 { f2[i] += g2[i] * g2[i] }
        }
        return [f1, f2]
    }

    /// Runs the Fisher phase on the toy through the training hooks, one micro-batch per step.
    static func allocatedToy(_ json: String, steps: Int) throws -> (AdaptedModel, NamedAdapter, Linear, Linear, [[Double]]) {
        let (root, first, second) = toy()
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("t", config: AdapterConfig(jsonText: json, source: "trpts"), seed: 3)
        let data = batches(steps)
        model.setTraining(true)
        for (step, (x, w)) in data.enumerated() {
            let out = second.forward(first.forward(Tensor(shape: [3, 8], values: x.map(Float.init))))
            sum(out * Tensor(shape: [3, 5], values: w.map(Float.init))).backward()
            adapter.afterBackward(step: step)
            if step == 0 {
                // The probes' Fisher after one batch, against the closed form.
                let brute = bruteForceFisher(first, second, Array(data.prefix(1)))
                for (l, entry) in adapter.layers.enumerated() {
                    let fisher = try #require((entry.adapter as? TRPTSLayer)?.fisher)
                    #expect(maxRelativeError(fisher.map(Double.init), brute[l]) < 1e-4, "\(entry.path) Fisher")
                }
            }
            for p in adapter.parameters { p.grad = nil }
            for hook in adapter.trainingHooks { hook.didUpdate(step: step + 1, totalSteps: steps + 2) }
        }
        model.setTraining(false)
        return (model, adapter, first, second, bruteForceFisher(first, second, data))
    }

    /// The entries a layer-wise allocation of `budget` picks from `fisher`, written out directly: each layer's
    /// count is its number of entries among the global top `budget`; per neuron, each row's top ⌊n/rows⌋ and then
    /// the best of the rest.
    static func expectedSelection(_ fisher: [[Double]], shapes: [(Int, Int)], budget: Int, perNeuron: Bool) -> [Set<Int>] {
        let ranked = fisher.enumerated().flatMap { l, f in f.indices.map { (l, $0, f[$0]) } }
            .sorted { $0.2 != $1.2 ? $0.2 > $1.2 : ($0.0, $0.1) < ($1.0, $1.1) }.prefix(budget)
        var global = [Set<Int>](repeating: [], count: fisher.count)
        for (l, i, _) in ranked { global[l].insert(i) }
        guard perNeuron else { return global }
        return fisher.indices.map { l in
            let (rows, cols) = shapes[l], n = global[l].count, k = n / rows
            var chosen = Set<Int>()
            for r in 0..<rows {
                let best = (0..<cols).sorted { fisher[l][r * cols + $0] != fisher[l][r * cols + $1] ? fisher[l][r * cols + $0] > fisher[l][r * cols + $1] : $0 < $1 }
                for c in best.prefix(k) { chosen.insert(r * cols + c) }
            }
            let rest = fisher[l].indices.filter { !chosen.contains($0) }.sorted { fisher[l][$0] != fisher[l][$1] ? fisher[l][$0] > fisher[l][$1] : $0 < $1 }
            return chosen.union(rest.prefix(n - chosen.count))
        }
    }

    @Test(arguments: [true, false])
    func fisherTopEntriesAreSelectedWithinTheExactBudget(perNeuron: Bool) throws {
        let json = #"{"peft_type":"TR_PTS","budget":17,"fisher_steps":3,"per_neuron":\#(perNeuron),"target_modules":["proj"]}"#
        let (_, adapter, _, _, brute) = try Self.allocatedToy(json, steps: 3)
        let layers = adapter.layers.compactMap { $0.adapter as? TRPTSLayer }
        #expect(layers.count == 2 && layers.allSatisfy { $0.isAllocated })
        #expect(adapter.parameterCount == 17 && layers.reduce(0) { $0 + $1.count } == 17, "budget kept: \(adapter.parameterCount)")
        // The layers' slices tile the shared values.
        #expect(layers[0].offset == 0 && layers[1].offset == layers[0].count)
        let expected = Self.expectedSelection(brute, shapes: [(6, 8), (5, 6)], budget: 17, perNeuron: perNeuron)
        for (l, layer) in layers.enumerated() {
            #expect(Set(layer.positions) == expected[l], "layer \(l): chose \(layer.positions.sorted()), expected \(expected[l].sorted())")
        }
        print("TR-PTS toy allocation (per_neuron \(perNeuron)): \(layers.map(\.count)) of 17")
    }

    @Test func gradientsMatchFiniteDifferences() throws {
        let json = #"{"peft_type":"TR_PTS","budget":20,"fisher_steps":2,"target_modules":["proj"]}"#
        let (_, adapter, first, second, _) = try Self.allocatedToy(json, steps: 2)
        var rng = GraftRNG(seed: 5)
        for p in adapter.parameters { for i in 0..<p.count { p.pointer[i] = 0.3 * rng.nextNormal() } }
        let x = Tensor.randomNormal([3, 8], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([3, 5], rng: &rng)
        func objective() -> Double {
            zip(withNoGrad { second.forward(first.forward(x.detached())) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(second.forward(first.forward(x)) * w).backward()
        let params = adapter.parameters.map { (key: "trpts_values", tensor: $0) } + [("input", x)]
        let check = finiteDifferenceCheck(params, step: 1e-2, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty, "no gradient for \(check.missing)")
        #expect(check.worst < 2e-3, "worst gradient error \(check.worst)")
    }

    static func batch() throws -> TokenBatch { try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 102]]) }

    static func relative(_ a: Tensor, _ b: Tensor) -> Float { maxAbsDifference(a, b) / max(1, b.scalars.map(abs).max() ?? 1) }

    /// On MiniLM: allocated from one warm-up gradient, perturbed, merge reproduces the unmerged output, unmerge
    /// restores the weights, save → load into a fresh model reproduces it (indices and slots saved as int32).
    @Test func mergeUnmergeAndSaveLoad() throws {
        let bert = try Assets.loadMiniLM()
        let base = try withNoGrad { try bert.forward(try Self.batch()) }
        let originals: [(String, Tensor)] = bert.namedModules().compactMap { e in (e.module as? Linear).map { (e.name, $0.weight.copy()) } }
        let model = AdaptedModel(root: bert)
        let json = #"{"peft_type":"TR_PTS","density":0.01,"fisher_steps":1,"target_modules":["query","value"]}"#
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: "TR_PTS"), seed: 7)
        #expect(Self.relative(try withNoGrad { try bert.forward(try Self.batch()) }, base) <= 1e-6, "fresh")
        model.setTraining(true)
        sum(try bert.forward(try Self.batch())).backward()
        model.setTraining(false)
        adapter.afterBackward(step: 0)
        for hook in adapter.trainingHooks { hook.didUpdate(step: 1, totalSteps: 2) }
        let layers = adapter.layers.compactMap { $0.adapter as? TRPTSLayer }
        #expect(layers.allSatisfy { $0.isAllocated } && layers.reduce(0) { $0 + $1.count } == adapter.parameterCount)
        #expect(adapter.parameterCount == Int((0.01 * Double(12 * 384 * 384)).rounded(.up)))
        for p in adapter.parameters { p.grad = nil }
        var rng = GraftRNG(seed: 5)
        for p in adapter.parameters { for i in 0..<p.count { p.pointer[i] += 0.02 * rng.nextNormal() } }
        let unmerged = try withNoGrad { try bert.forward(try Self.batch()) }
        #expect(Self.relative(unmerged, base) > 1e-4, "the perturbed adapter changes nothing")
        try model.merge("default")
        let merged = try withNoGrad { try bert.forward(try Self.batch()) }
        #expect(Self.relative(merged, unmerged) <= 1e-5, "merged: \(Self.relative(merged, unmerged))")
        // The merge writes W + δ at the chosen entries and leaves every other entry bit for bit.
        let before = Dictionary(originals, uniquingKeysWith: { a, _ in a })
        for (path, lin, method) in adapter.layers {
            guard let layer = method as? TRPTSLayer, let w = before[path] else { continue }
            var expected = w.scalars
            for (k, p) in layer.positions.enumerated() { expected[p] = w.scalars[p] + Self.values(adapter)[layer.offset + k] }
            #expect(lin.weight.scalars == expected, "\(path): merged weight is not W + δ entry for entry")
        }
        try model.unmerge("default")
        for (path, w) in originals {
            guard let lin = bert.namedModules().first(where: { $0.name == path })?.module as? Linear else { continue }
            #expect(maxAbsDifference(lin.weight, w) < 1e-6, "\(path) weight after unmerge")
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-trpts-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let file = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        #expect(config?["peft_type"] as? String == "TR_PTS")
        #expect(file.info(TRPTSFactory.valuesKey)?.shape == [adapter.parameterCount])
        for suffix in ["trpts_indices", "trpts_slot"] {
            let keys = file.names.filter { $0.hasSuffix(suffix) }
            #expect(keys.count == layers.count && keys.allSatisfy { file.info($0)?.dtype == .i32 }, "\(suffix): \(keys)")
        }
        let other = try Assets.loadMiniLM()
        let loaded = try AdaptedModel(root: other).loadAdapter(directory: dir)
        let reloaded = try withNoGrad { try other.forward(try Self.batch()) }
        #expect(Self.relative(reloaded, unmerged) <= 1e-6, "reloaded: \(Self.relative(reloaded, unmerged))")
        let back = loaded.layers.compactMap { $0.adapter as? TRPTSLayer }
        #expect(zip(back, layers).allSatisfy { $0.offset == $1.offset && $0.positions == $1.positions })
    }

    /// Through a classifier that reduces tokens (merging at layers 1 and 3), the values' gradients match central
    /// differences (entries where a token choice flips inside the step are left out as kinks).
    @Test func gradientsThroughTokenReductionMatchFiniteDifferences() throws {
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 1)
        let model = AdaptedModel(root: classifier)
        let json = #"{"peft_type":"TR_PTS","budget":400,"fisher_steps":1,"token_keep_ratio":0.5,"token_reduction_layers":[1,3],"target_modules":["query","value"]}"#
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: "fd"), seed: 1)
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 2003, 1037, 2307, 2154, 102], [101, 2023, 2001, 2172, 102]])
        model.setTraining(true)
        sum(try classifier.forward(batch)).backward()
        adapter.afterBackward(step: 0)
        for hook in adapter.trainingHooks { hook.didUpdate(step: 1, totalSteps: 2) }
        model.setTraining(false)
        let values = try #require(adapter.parameters.first)
        for p in adapter.parameters { p.grad = nil }
        #expect(adapter.layers.compactMap { $0.adapter as? TRPTSLayer }.allSatisfy { $0.isAllocated })
        var rng = GraftRNG(seed: 9)
        for i in 0..<values.count { values.pointer[i] = 0.05 * rng.nextNormal() }
        let w = Tensor.randomNormal([2, 3], rng: &rng)
        sum(try classifier.forward(batch) * w).backward()
        func objective() throws -> Double {
            zip(try withNoGrad { try classifier.forward(batch) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let check = try finiteDifferenceCheck([("trpts_values", values)], step: 1e-2, samples: 40, skipKinks: true, value: objective)
        #expect(check.missing.isEmpty)
        #expect(check.worst < 1e-2, "worst gradient error \(check.worst) (\(check.kinks) kinks)")
        print("TR-PTS through token reduction: worst gradient error \(check.worst), \(check.kinks) kinks")
    }

    /// A causal decoder refuses token reduction by name; the parameter selection alone attaches.
    @Test func causalDecoderRefusesTokenReduction() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        let reducing = #"{"peft_type":"TR_PTS","token_keep_ratio":0.5,"target_modules":["q_proj"]}"#
        do {
            try model.addAdapter("r", config: AdapterConfig(jsonText: reducing, source: "decoder.json"))
            Issue.record("token reduction attached to a causal decoder")
        } catch let e as GraftError {
            #expect(e.code == .unsupported && e.message.contains("token_keep_ratio") && e.message.contains("causal decoder"), "\(e.message)")
        }
        #expect(model.adapters.isEmpty)
        let plain = try model.addAdapter("p", config: AdapterConfig(jsonText: #"{"peft_type":"TR_PTS","density":0.001,"target_modules":["q_proj"]}"#, source: "decoder.json"))
        #expect(plain.parameterCount > 0)
    }

    static func values(_ adapter: NamedAdapter) -> [Float] { adapter.parameters.first?.scalars ?? [] }

    /// Bad values are refused by name; a file whose slot points outside the values is refused on load.
    @Test func invalidConfigsAndFilesAreNamed() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        for (json, field) in [(#"{"peft_type":"TR_PTS","density":0,"target_modules":["query"]}"#, "density"),
                              (#"{"peft_type":"TR_PTS","fisher_steps":0,"target_modules":["query"]}"#, "fisher_steps"),
                              (#"{"peft_type":"TR_PTS","budget":999999999,"target_modules":["query"]}"#, "budget"),
                              (#"{"peft_type":"TR_PTS","token_keep_ratio":1.5,"target_modules":["query"]}"#, "token_keep_ratio"),
                              (#"{"peft_type":"TR_PTS","token_keep_ratio":0.5,"token_reduction_layers":[9],"target_modules":["query"]}"#, "token_reduction_layers"),
                              (#"{"peft_type":"TR_PTS","token_reduction_layers":"all","target_modules":["query"]}"#, "token_reduction_layers"),
                              (#"{"peft_type":"TR_PTS","token_merge":"average","target_modules":["query"]}"#, "token_merge")] {
            #expect(throws: GraftError.self, "\(field)") {
                do { try model.addAdapter("x", config: AdapterConfig(jsonText: json, source: "cfg")) } catch let e as GraftError {
                    #expect(e.message.contains(field), "\(e.message)")
                    throw e
                }
            }
        }
        let layer = TRPTSLayer(base: bert.layers[0].query, values: Tensor(zeros: [10]), state: AdapterState(seed: 0))
        try layer.loadIntegers("trpts_indices", values: [0, 1], shape: [2, 1])
        #expect(throws: GraftError.self) { try layer.loadIntegers("trpts_slot", values: [5, 6], shape: [2]) }
        try layer.loadIntegers("trpts_indices", values: [0, 0, 1, 1], shape: [2, 2])
        #expect(throws: GraftError.self) { try layer.loadIntegers("trpts_slot", values: [0, 2], shape: [2]) }  // (0, 1) twice
    }
}
