import Foundation
import Testing
@testable import Graft
@testable import GraftRouting
import GraftTestSupport

/// Mixed-adapter batches: every row of one batch with its own adapter must give what that row gives alone.
@Suite(.serialized) struct MixedAdapterBatchTests {
    /// Moves every parameter of adapter `name` off its initial value (most methods start as the identity).
    static func perturb(_ s: GraftSession, _ name: String, seed: UInt64, scale: Float = 0.05) throws {
        var rng = GraftRNG(seed: seed)
        for (_, _, layer) in try s.adapted.adapter(name).layers {
            for (_, t) in layer.namedParameters {
                for i in 0..<t.count { t.pointer[i] += scale * (2 * rng.nextUniform() - 1) }
            }
        }
    }

    /// Adds adapters from (name, config JSON) pairs and perturbs them.
    static func add(_ s: GraftSession, _ adapters: [(String, String)]) throws {
        for (i, (name, json)) in adapters.enumerated() {
            try s.addAdapter(name: name, configJSON: json, seed: UInt64(10 + i))
            try perturb(s, name, seed: UInt64(100 + i))
        }
    }

    static func use(_ s: GraftSession, _ id: Int32) throws {
        if id < 0 {
            s.adapted.setAdaptersDisabled(true)
        } else {
            try s.adapted.setActiveAdapter(s.adapted.adapters[Int(id)].name)
            s.adapted.setAdaptersDisabled(false)
        }
    }

    /// Runs `rows` as one mixed batch and each row alone under its adapter (the ordinary path, one sequence per
    /// batch); returns the largest absolute difference over real positions and the largest relative to the
    /// row's largest value.
    static func maxDifference(_ s: GraftSession, rows: [[Int32]], ids: [Int32], output: SessionOutput,
                              perToken: Bool = true) throws -> (absolute: Float, relative: Float) {
        let stride = rows.map(\.count).max() ?? 0
        let batch = try s.tokenBatch(ids: rows.flatMap { $0 + [Int32](repeating: 0, count: stride - $0.count) },
                                     lengths: rows.map(\.count), batch: rows.count, stride: stride)
        let mixed = try s.forward(batch: batch, adapterIds: ids, output: output)
        let perRow = mixed.count / rows.count
        let width = perToken ? perRow / stride : perRow
        var worst: Float = 0, worstRelative: Float = 0
        for (r, row) in rows.enumerated() {
            try use(s, ids[r])
            let alone = try s.forward(batch: try s.tokenBatch(ids: row, lengths: nil, batch: 1, stride: row.count),
                                      adapterIds: nil, output: output)
            #expect(alone.count == (perToken ? row.count : 1) * width)
            var rowWorst: Float = 0, magnitude: Float = 0
            for i in 0..<alone.count {
                rowWorst = worse(rowWorst, abs(alone[i] - mixed[r * perRow + i]))
                magnitude = max(magnitude, abs(alone[i]))
            }
            worst = worse(worst, rowWorst)
            worstRelative = worse(worstRelative, rowWorst / max(magnitude, 1))
            // Padding positions stay zero.
            for i in alone.count..<perRow { #expect(mixed[r * perRow + i] == 0) }
        }
        s.adapted.setAdaptersDisabled(false)
        return (worst, worstRelative)
    }

    /// Runs `rows` as one mixed batch, and the same batch once per adapter id through the ordinary path (every
    /// row under that adapter); returns the largest difference between each mixed row and the same row of the
    /// run under its own adapter. Same GEMM shapes on both sides, so this isolates the routing from float32
    /// differences between batch sizes.
    static func sameBatchDifference(_ s: GraftSession, rows: [[Int32]], ids: [Int32], output: SessionOutput) throws -> (absolute: Float, relative: Float) {
        let stride = rows.map(\.count).max() ?? 0
        let batch = try s.tokenBatch(ids: rows.flatMap { $0 + [Int32](repeating: 0, count: stride - $0.count) },
                                     lengths: rows.map(\.count), batch: rows.count, stride: stride)
        let mixed = try s.forward(batch: batch, adapterIds: ids, output: output)
        let perRow = mixed.count / rows.count
        var worst: Float = 0, worstRelative: Float = 0
        for id in Set(ids) {
            try use(s, id)
            let whole = try s.forward(batch: batch, adapterIds: nil, output: output)
            for r in ids.indices where ids[r] == id {
                var rowWorst: Float = 0, magnitude: Float = 0
                for i in (r * perRow)..<((r + 1) * perRow) {
                    rowWorst = worse(rowWorst, abs(whole[i] - mixed[i]))
                    magnitude = max(magnitude, abs(whole[i]))
                }
                worst = worse(worst, rowWorst)
                worstRelative = worse(worstRelative, rowWorst / max(magnitude, 1))
            }
        }
        s.adapted.setAdaptersDisabled(false)
        return (worst, worstRelative)
    }

    static func rows(_ count: Int, lengths: [Int], vocab: Int, seed: UInt64, first: Int32? = nil) -> [[Int32]] {
        var rng = GraftRNG(seed: seed)
        return (0..<count).map { i in
            let n = lengths[i % lengths.count]
            return (0..<n).map { t in t == 0 && first != nil ? first ?? 0 : Int32(1000 + Int(rng.next() % UInt64(vocab - 2000))) }
        }
    }

    @Test func smolLM2MixedBatchMatchesEachSequenceAlone() throws {
        let s = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        try Self.add(s, [
            ("lora_a", #"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": false}"#),
            ("lora_b", #"{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": false}"#),
            ("lora_c", #"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": true, "target_modules": ["o_proj", "down_proj"], "init_lora_weights": false}"#),
            ("ia3", #"{"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#),
            ("road", #"{"peft_type": "ROAD", "variant": "road_1", "group_size": 64, "target_modules": ["o_proj", "up_proj"]}"#),
            ("loha", #"{"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj", "gate_proj"]}"#),
            ("oft", #"{"peft_type": "OFT", "oft_block_size": 32, "r": 0, "target_modules": ["q_proj", "up_proj"]}"#),
        ])
        let ids: [Int32] = [3, -1, 0, 5, 1, 4, 0, -1, 2, 6, 1]
        let rows = Self.rows(ids.count, lengths: [9, 5, 12, 7], vocab: 49152, seed: 7)
        // SmolLM2's final hidden states reach |h| ≈ 50 (one float32 ulp ≈ 4e-6) after 30 layers, and a different
        // GEMM shape (a batch of one, rows regrouped, an adapter applied to a segment) rounds differently: even
        // base rows, which no adapter touches, differ by ~2e-5 from their batch-of-one run. So SmolLM2 is
        // checked relative to each row's largest value (MiniLM, |h| < 10, absolutely).
        let same = try Self.sameBatchDifference(s, rows: rows, ids: ids, output: .hidden)
        print("SmolLM2 mixed batch (LoRA ×3, IA³, RoAd, LoHa, OFT, base) vs the same batch under each row's adapter, hidden states: max |Δ| = \(same.absolute), relative \(same.relative)")
        #expect(same.relative <= 1e-5)
        let alone = try Self.maxDifference(s, rows: rows, ids: ids, output: .hidden)
        print("SmolLM2 mixed batch vs each sequence alone, hidden states: max |Δ| = \(alone.absolute), relative \(alone.relative)")
        #expect(alone.relative <= 1e-5)
        let logits = try Self.maxDifference(s, rows: Array(rows.prefix(6)), ids: Array(ids.prefix(6)), output: .logits)
        print("SmolLM2 mixed batch vs each sequence alone, logits: max |Δ| = \(logits.absolute), relative \(logits.relative)")
        // The logits add 576 such hidden-state differences through the LM head: measured up to 1.03e-5 of the
        // row's largest logit (≈ 5 float32 ulps at |logit| ≈ 30) on an AVX-512 CPU, so the bound is 2e-5.
        #expect(logits.relative <= 2e-5)
    }

    @Test func everyAdaptedSmolLM2LayerMatchesPerRowRunsWithinRounding() throws {
        // Layer by layer, a mixed batch is checked against each row through the ordinary path under its adapter:
        // LoRA ×2, IA³ (input and output scaling), RoAd, VeRA, LoKr, HRA. The two paths add the same products in
        // different orders (a batch of one against grouped rows), so each output element may differ by the
        // rounding of its sum: `reorderingTolerance` of K = in_features products of magnitude Σ|W + ΔW|·|x|.
        // A row routed to the wrong adapter misses by |ΔW·x|, which the test shows is far larger.
        let s = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        try Self.add(s, [
            ("lora_a", #"{"peft_type": "LORA", "r": 16, "target_modules": "all-linear", "init_lora_weights": false}"#),
            ("lora_b", #"{"peft_type": "LORA", "r": 4, "lora_alpha": 32, "target_modules": ["q_proj", "down_proj"], "init_lora_weights": false}"#),
            ("ia3", #"{"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#),
            ("road", #"{"peft_type": "ROAD", "variant": "road_4", "group_size": 64, "target_modules": ["q_proj", "down_proj"]}"#),
            ("vera", #"{"peft_type": "VERA", "r": 8, "target_modules": ["q_proj", "v_proj"]}"#),
            ("lokr", #"{"peft_type": "LOKR", "r": 4, "target_modules": ["q_proj", "down_proj"]}"#),
            ("hra", #"{"peft_type": "HRA", "r": 4, "target_modules": ["q_proj", "down_proj"]}"#),
        ])
        let ids: [Int32] = [5, 0, -1, 3, 6, 1, 2, 4, 0, -1]
        let plan = try AdapterBatchPlan(adapterIds: ids, adapterCount: s.adapted.adapters.count)
        let t = 3
        var worst: Float = 0, worstShare = 0.0, weakestAdapterEffect = Double.infinity
        for layer in ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.7.mlp.down_proj"] {
            guard let lin = s.adapted.root.namedModules().first(where: { $0.name == layer })?.module as? Linear else {
                Issue.record("no Linear \(layer)"); continue
            }
            var rng = GraftRNG(seed: 11)
            let x = Tensor.randomUniform([ids.count, t, lin.inFeatures], low: -1, high: 1, rng: &rng)
            let grouped = Tensor(zeros: x.shape)
            for (i, r) in plan.order.enumerated() { grouped.rowsView(i..<(i + 1)).pointer.update(from: x.rowsView(r..<(r + 1)).pointer, count: t * lin.inFeatures) }
            let mixed = try MixedAdapterBatch.withRouting(s.adapted, ids: plan.sortedIds) { lin.forward(grouped) }
            let base = s.adapted.withAdaptersDisabled { withNoGrad { lin.forward(x) } }
            for (i, r) in plan.order.enumerated() {
                try Self.use(s, ids[r])
                let row = x.rowsView(r..<(r + 1)).copy()
                let alone = withNoGrad { lin.forward(row) }
                let delta = ids[r] < 0 ? nil : try s.adapted.adapter(s.adapted.adapters[Int(ids[r])].name).layers
                    .first(where: { $0.path == layer })?.adapter.deltaWeight(base: lin)
                let magnitude = Self.productMagnitudes(lin, delta: delta, x: row)
                let m = mixed.rowsView(i..<(i + 1)), plain = base.rowsView(r..<(r + 1))
                var adapterEffect = 0.0
                for j in 0..<alone.count {
                    let difference = abs(alone.pointer[j] - m.pointer[j])
                    let tolerance = reorderingTolerance(terms: lin.inFeatures, absoluteSum: magnitude[j])
                    if !(Double(difference) <= tolerance) {
                        Issue.record("\(layer) row \(r) (adapter \(ids[r])) element \(j): mixed \(m.pointer[j]) vs alone \(alone.pointer[j]), |Δ| \(difference) > \(tolerance)")
                        break
                    }
                    worst = worse(worst, difference)
                    worstShare = worse(worstShare, Double(difference) / tolerance)
                    adapterEffect = worse(adapterEffect, Double(abs(alone.pointer[j] - plain.pointer[j])) / tolerance)
                }
                if delta != nil { weakestAdapterEffect = min(weakestAdapterEffect, adapterEffect) }
            }
            s.adapted.setAdaptersDisabled(false)
        }
        print("SmolLM2 adapted layers, mixed rows vs each row alone: max |Δ| = \(worst), at most \(worstShare) of the rounding tolerance")
        #expect(worstShare <= 1)
        // The check can fail: every adapted row's adapter moves it by far more than the tolerance.
        print("SmolLM2 adapted layers: each adapted row moves at least \(weakestAdapterEffect)× the tolerance away from the base")
        #expect(weakestAdapterEffect >= 10)
    }

    /// Σⱼ (|Wᵢⱼ| + |ΔWᵢⱼ|)·|xⱼ| + |bᵢ| for every token of `x` ([1, T, in]) and output i: the magnitude of the
    /// products each output element sums, which its rounding error scales with.
    static func productMagnitudes(_ lin: Linear, delta: Tensor?, x: Tensor) -> [Double] {
        let (n, k) = (lin.outFeatures, lin.inFeatures)
        let tokens = x.count / k
        // A quantized layer's weight is decoded on every read: once here.
        let weight = lin.weight
        var out = [Double](repeating: 0, count: tokens * n)
        for tok in 0..<tokens {
            for i in 0..<n {
                var sum = Double(abs(lin.bias?.pointer[i] ?? 0))
                for j in 0..<k {
                    let w = Double(abs(weight.pointer[i * k + j])) + Double(abs(delta?.pointer[i * k + j] ?? 0))
                    sum += w * Double(abs(x.pointer[tok * k + j]))
                }
                out[tok * n + i] = sum
            }
        }
        return out
    }

    @Test func miniLMMixedBatchMatchesEachSequenceAlone() throws {
        let s = try GraftSession(path: try Assets.require(Assets.minilm), task: .base)
        try Self.add(s, [
            ("lora_a", #"{"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"], "init_lora_weights": false}"#),
            ("lora_b", #"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "dense"], "init_lora_weights": false}"#),
            ("ia3", #"{"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}"#),
            ("road", #"{"peft_type": "ROAD", "variant": "road_2", "group_size": 64, "target_modules": ["query", "value"]}"#),
            ("vera", #"{"peft_type": "VERA", "r": 16, "target_modules": ["query", "value"]}"#),
            ("dora", #"{"peft_type": "LORA", "r": 4, "use_dora": true, "target_modules": ["query", "value"], "init_lora_weights": false}"#),
        ])
        // PEFT's own BOFT (butterfly rotations of the input), FourierFT and Poly (one task id set) adapters.
        for method in ["boft", "fourierft", "poly"] {
            _ = try s.adapted.loadAdapter(directory: Assets.fixture("peft-minilm/\(method)"), name: method)
        }
        try s.adapted.setTaskIDs([2])
        let ids: [Int32] = [4, 0, -1, 7, 2, 5, 8, 1, 3, 0, -1, 6, 4]
        let rows = Self.rows(ids.count, lengths: [8, 13, 5, 10, 16], vocab: 30522, seed: 9, first: 101)
        let d = try Self.maxDifference(s, rows: rows, ids: ids, output: .hidden)
        print("MiniLM mixed batch (LoRA ×2, IA³, RoAd, VeRA, DoRA, BOFT, FourierFT, Poly, base) vs each sequence alone, hidden states: max |Δ| = \(d.absolute)")
        #expect(d.absolute <= 1e-5)
        let same = try Self.sameBatchDifference(s, rows: rows, ids: ids, output: .hidden)
        print("MiniLM mixed batch vs the same batch under each row's adapter: max |Δ| = \(same.absolute)")
        #expect(same.absolute <= 1e-5)
    }

    @Test func sequenceClassificationHeadsFollowTheirRows() throws {
        // modules_to_save copies of the classifier are routed per row as well.
        let s = try GraftSession(path: try Assets.require(Assets.minilm), task: .sequenceClassification, numLabels: 3)
        try Self.add(s, [
            ("a", #"{"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"], "modules_to_save": ["classifier"], "init_lora_weights": false}"#),
            ("b", #"{"peft_type": "IA3", "target_modules": ["key", "value"], "modules_to_save": ["classifier"]}"#),
        ])
        for name in ["a", "b"] {
            var rng = GraftRNG(seed: name == "a" ? 1 : 2)
            for (_, _, saved) in try s.adapted.adapter(name).savedModules {
                for i in 0..<saved.weight.count { saved.weight.pointer[i] += 0.1 * (2 * rng.nextUniform() - 1) }
            }
        }
        let ids: [Int32] = [1, -1, 0, 1, 0]
        let d = try Self.maxDifference(s, rows: Self.rows(5, lengths: [6, 9, 4], vocab: 30522, seed: 3, first: 101),
                                       ids: ids, output: .logits, perToken: false)
        print("MiniLM sequence classification mixed batch vs each sequence alone: max |Δ| = \(d.absolute)")
        #expect(d.absolute <= 1e-5)
    }

    @Test func mixedGenerationMatchesEachPromptAlone() throws {
        let s = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        try Self.add(s, [
            ("lora_a", #"{"peft_type": "LORA", "r": 8, "target_modules": "all-linear", "init_lora_weights": false}"#),
            ("lora_b", #"{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"], "init_lora_weights": false}"#),
            ("ia3", #"{"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#),
        ])
        let prompts: [[Int32]] = [
            s.model.tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
            s.model.tokenizer.encode("The quick brown fox"),
            s.model.tokenizer.encode("Once upon a time, in a land far away,"),
            s.model.tokenizer.encode("1, 2, 3,"),
        ]
        let ids: [Int32] = [2, -1, 0, 1]
        let params = GenerationParameters(maxNewTokens: 10)
        var streamed = [[Int32]](repeating: [], count: prompts.count)
        let mixed = try s.generate(prompts: prompts, adapterIds: ids, parameters: params, stopAtEOS: false) { i, t in
            streamed[i].append(t)
            return true
        }
        #expect(streamed == mixed)
        for (i, prompt) in prompts.enumerated() {
            if ids[i] < 0 {
                s.adapted.setAdaptersDisabled(true)
            } else {
                try s.adapted.setActiveAdapter(s.adapted.adapters[Int(ids[i])].name)
                s.adapted.setAdaptersDisabled(false)
            }
            let alone = try s.generate(prompt: prompt, parameters: params, stopAtEOS: false) { _, _ in true }
            #expect(alone == mixed[i], "prompt \(i) (adapter \(ids[i]))")
        }
        s.adapted.setAdaptersDisabled(false)
    }

    @Test func methodsThatCannotMixThrowClearly() throws {
        let s = try GraftSession(path: try Assets.require(Assets.minilm), task: .base)
        try s.addAdapter(name: "lora", configJSON: #"{"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"]}"#)
        try s.addAdapter(name: "prompt", configJSON: #"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}"#)
        let batch = try s.tokenBatch(ids: [101, 2023, 102, 101, 2003, 102], lengths: nil, batch: 2, stride: 3)
        do {
            _ = try s.forward(batch: batch, adapterIds: [0, 1], output: .hidden)
            Issue.record("a prompt-tuning adapter in a mixed batch should throw")
        } catch let e as GraftError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("'prompt'") && e.message.contains("PROMPT_TUNING") && e.message.contains("virtual tokens"))
        }
        // The prompt adapter not named by any row does not stop the batch.
        _ = try s.forward(batch: batch, adapterIds: [0, -1], output: .hidden)
        do {
            _ = try s.forward(batch: batch, adapterIds: [0, 9], output: .hidden)
            Issue.record("an unknown adapter id should throw")
        } catch let e as GraftError {
            #expect(e.code == .invalidArgument && e.message.contains("adapter_ids[1] = 9 names no adapter"))
        }
        // Poly with per-example task ids: the ids index positions of the whole batch, so it cannot mix.
        _ = try s.adapted.loadAdapter(directory: Assets.fixture("peft-minilm/poly"), name: "poly")
        try s.adapted.setTaskIDs([0, 1])
        do {
            _ = try s.forward(batch: batch, adapterIds: [2, -1], output: .hidden)
            Issue.record("Poly with per-example task ids in a mixed batch should throw")
        } catch let e as GraftError {
            #expect(e.code == .unsupported && e.message.contains("'poly'") && e.message.contains("task ids"))
        }
        try s.adapted.setTaskIDs(nil)
        _ = try s.forward(batch: batch, adapterIds: [2, -1], output: .hidden)
        try s.adapted.setActiveAdapter("prompt")
        try s.adapted.merge("lora")
        #expect(throws: GraftError.self) { _ = try s.forward(batch: batch, adapterIds: [0, -1], output: .hidden) }
        try s.adapted.unmerge("lora")
        // The adapter switches and the layers' adapter lists are as before.
        #expect(s.adapted.activeAdapter == "prompt" && !s.adapted.adaptersDisabled)
        #expect(s.adapted.root.namedModules().compactMap { $0.module as? Linear }.allSatisfy { !$0.adapters.contains { $0 is RoutedLinear } })
    }

    @Test func planGroupsRowsStablyAndScattersBack() throws {
        let plan = try AdapterBatchPlan(adapterIds: [2, -1, 0, 2, -1, 1], adapterCount: 3)
        #expect(plan.order == [1, 4, 2, 5, 0, 3])
        #expect(plan.segments.map(\.adapterId) == [-1, 0, 1, 2])
        #expect(plan.segments.map(\.rows) == [0..<2, 2..<3, 3..<4, 4..<6])
        let values = plan.order.flatMap { [Float($0), Float($0) + 0.5] }
        #expect(plan.scatter(values, perRow: 2) == (0..<6).flatMap { [Float($0), Float($0) + 0.5] })
        #expect(throws: GraftError.self) { try AdapterBatchPlan(adapterIds: [0, 3], adapterCount: 3) }
    }
}
