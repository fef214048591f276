import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// Every catalog method's trainable parameters: analytic gradients through the method's own forward against
/// central finite differences of that forward (evaluated in Float32, accumulated in Float64). Forward values
/// themselves are checked against PEFT in the parity tests; this checks backward against forward.
@Suite struct MethodGradientTests {
    static let configs: [(String, String)] = [
        ("LoRA", #"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["proj"],"init_lora_weights":false}"#),
        ("DoRA", #"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["proj"],"use_dora":true,"init_lora_weights":false}"#),
        ("IA3 output", #"{"peft_type":"IA3","target_modules":["proj"],"feedforward_modules":[]}"#),
        ("IA3 feed-forward", #"{"peft_type":"IA3","target_modules":["proj"],"feedforward_modules":["proj"]}"#),
        ("LoHa", #"{"peft_type":"LOHA","r":2,"alpha":4,"target_modules":["proj"]}"#),
        ("LoKr", #"{"peft_type":"LOKR","r":2,"alpha":4,"target_modules":["proj"]}"#),
        ("VeRA", #"{"peft_type":"VERA","r":4,"target_modules":["proj"]}"#),
        ("HRA", #"{"peft_type":"HRA","r":2,"target_modules":["proj"]}"#),
        ("MiSS", #"{"peft_type":"MISS","r":4,"target_modules":["proj"]}"#),
        ("RoAd", #"{"peft_type":"ROAD","group_size":4,"target_modules":["proj"]}"#),
        ("AdaLoRA", #"{"peft_type":"ADALORA","init_r":3,"lora_alpha":4,"target_modules":["proj"]}"#),
        ("SHiRA", #"{"peft_type":"SHIRA","r":1,"target_modules":["proj"]}"#),
        ("OFT", #"{"peft_type":"OFT","oft_block_size":4,"r":0,"target_modules":["proj"]}"#),
        ("RandLoRA", #"{"peft_type":"RANDLORA","r":2,"randlora_alpha":4,"target_modules":["proj"]}"#),
        ("C3A", #"{"peft_type":"C3A","block_size":4,"target_modules":["proj"]}"#),
        ("VB-LoRA", #"{"peft_type":"VBLORA","r":2,"num_vectors":6,"vector_length":4,"topk":2,"target_modules":["proj"]}"#),
        ("BOFT", #"{"peft_type":"BOFT","boft_block_size":4,"boft_block_num":0,"boft_n_butterfly_factor":1,"target_modules":["proj"]}"#),
        ("BOFT butterfly", #"{"peft_type":"BOFT","boft_block_size":0,"boft_block_num":2,"boft_n_butterfly_factor":2,"target_modules":["proj"]}"#),
        ("FourierFT", #"{"peft_type":"FOURIERFT","n_frequency":12,"scaling":20,"random_loc_seed":5,"target_modules":["proj"]}"#),
        // 48 of the 8 × 8 spectrum: ΔW formed as the 2-D transform of the spectrum (FourierFTDefinitionTests).
        ("FourierFT dense spectrum", #"{"peft_type":"FOURIERFT","n_frequency":48,"scaling":20,"random_loc_seed":5,"target_modules":["proj"]}"#),
        ("Poly", #"{"peft_type":"POLY","r":2,"n_tasks":2,"n_skills":3,"n_splits":1,"init_weights":false,"target_modules":["proj"]}"#),
        ("MHR", #"{"peft_type":"POLY","r":2,"n_tasks":2,"n_skills":3,"n_splits":2,"init_weights":false,"target_modules":["proj"]}"#),
        ("ETHER", #"{"peft_type":"ETHER","nb":2,"side":"both","target_modules":["proj"]}"#),
        ("ETHER+", #"{"peft_type":"ETHER_PLUS","nb":2,"side":"both","target_modules":["proj"]}"#),
        ("LoRA-XS", #"{"peft_type":"LORAXS","r":3,"lora_alpha":4,"target_modules":["proj"]}"#),
        ("asymmetric LoRA", #"{"peft_type":"ASYMMETRIC_LORA","r":2,"lora_alpha":4,"target_modules":["proj"]}"#),
        ("PiSSA", #"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["proj"],"init_lora_weights":"pissa"}"#),
        ("MiLoRA", #"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["proj"],"init_lora_weights":"milora"}"#),
        ("OLoRA", #"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["proj"],"init_lora_weights":"olora"}"#),
        ("KaSA", #"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["proj"],"kasa_config":{},"init_lora_weights":false}"#),
        ("LoRA bias", #"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["proj"],"lora_bias":true,"init_lora_weights":false}"#),
        ("SVFT banded", #"{"peft_type":"SVFT","pattern":"banded","off_diag":1,"target_modules":["proj"]}"#),
        ("SVFT random", #"{"peft_type":"SVFT","pattern":"random","off_diag":2,"target_modules":["proj"]}"#),
        ("RoSA", #"{"peft_type":"ROSA","r":2,"lora_alpha":4,"density":0.1,"target_modules":["proj"]}"#),
    ]

    @Test(arguments: configs.map(\.0))
    func gradientsMatchFiniteDifferences(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        var rng = GraftRNG(seed: 11)
        let (inF, outF, rows) = (8, 8, 3)
        let proj = Linear(weight: Tensor.randomNormal([outF, inF], std: 0.5, rng: &rng), bias: Tensor.randomNormal([outF], rng: &rng))
        let root = ModuleList(typeName: "Toy", [("proj", proj)])
        let model = AdaptedModel(root: root)
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        // Poly / MHR: each of the three rows is an example with its own task.
        if adapter.config.peftType == "POLY" { try model.setTaskIDs([1, 0, 1]) }
        // Move every parameter off its (often identity) initialization.
        for (_, p) in adapter.peftStateDict {
            for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() }
        }
        let x = Tensor.randomNormal([rows, inF], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([rows, outF], rng: &rng)
        func objective() -> Double {
            let out = withNoGrad { proj.forward(x.detached()) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(proj.forward(x) * w).backward()
        // DoRA defines its A/B gradients with the weight norm detached (not the forward's true derivative);
        // those are checked against a detached-norm Float64 reference in AdapterGradientTests.
        let checked = (adapter.peftStateDict + [("input", x)]).filter { method != "DoRA" || !$0.key.contains("lora_") || $0.key.contains("magnitude") }
        // VB-LoRA selects its top-k logits: a smaller step keeps the selection fixed. ETHER normalizes short
        // vectors (‖u‖ ≈ 1): a smaller step keeps the truncation error of the difference down.
        let step: Float = ["VB-LoRA", "ETHER", "ETHER+"].contains(method) ? 1e-3 : 1e-2
        let check = finiteDifferenceCheck(checked, step: step, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty, "\(method): no gradient for \(check.missing)")
        #expect(check.worst < 2e-3, "\(method): worst gradient error \(check.worst)")
    }
}

@Suite(.serialized) struct MethodsOnBothModelsTests {
    /// Every method attaches to SmolLM2's q/k/v projections (k and v are 192 wide under grouped-query attention,
    /// q is 576), runs forward and backward, and leaves the base untouched when removed.
    @Test func everyMethodTrainsOnSmolLM2GroupedQueryProjections() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let batch = try TokenBatch(ids: [1, 504, 3458, 282, 4649, 314], batchSize: 1, length: 6)
        let base = try withNoGrad { try llama.logits(batch) }
        let model = AdaptedModel(root: llama)
        for (type, f) in AdapterRegistry.factories.sorted(by: { $0.key < $1.key }) {
            var json = f.exampleConfig(targets: ["q_proj", "k_proj", "v_proj"])
            json["peft_type"] = type
            json["layers_to_transform"] = [28, 29]
            let adapter = try model.addAdapter("m", config: AdapterConfig(json: json, source: type))
            for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.01 * Float(i % 7 - 3) } }
            let hidden = try llama.hiddenStates(batch)
            let loss = linearCrossEntropy(hidden.reshaped([6, llama.config.hiddenSize]), weight: llama.lmHead.weight,
                                          targets: [504, 3458, 282, 4649, 314, -100])
            loss.backward()
            #expect(loss.item.isFinite, "\(type): loss \(loss.item)")
            let missing = adapter.peftStateDict.filter { $0.tensor.grad == nil }.map(\.key)
            #expect(missing.isEmpty, "\(type): no gradient for \(missing.prefix(2))")
            try model.deleteAdapter("m")
        }
        for (type, f) in AdapterRegistry.moduleFactories.sorted(by: { $0.key < $1.key }) {
            var json = f.exampleConfig(targets: [])
            json["peft_type"] = type
            let adapter = try model.addAdapter("m", config: AdapterConfig(json: json, source: type))
            for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.01 } }
            let loss = linearCrossEntropy(try llama.hiddenStates(batch).reshaped([6, llama.config.hiddenSize]),
                                          weight: llama.lmHead.weight, targets: [504, 3458, 282, 4649, 314, -100])
            loss.backward()
            #expect(loss.item.isFinite && adapter.peftStateDict.allSatisfy { $0.tensor.grad != nil }, "\(type) on SmolLM2")
            try model.deleteAdapter("m")
        }
        #expect(maxAbsDifference(try withNoGrad { try llama.logits(batch) }, base) == 0)
    }
}

@Suite struct ModuleMethodGradientTests {
    /// Central differences of the module's own forward against the analytic gradients of its adapter.
    func check(_ name: String, params: [(String, Tensor)], objective: () -> Tensor) {
        let w = objective().scalars.enumerated().map { Float(($0.offset * 7919) % 13) / 13 - 0.5 }
        func value() -> Double {
            withNoGrad { zip(objective().scalars, w).reduce(0) { $0 + Double($1.0) * Double($1.1) } }
        }
        let out = objective()
        sum(out * Tensor(shape: out.shape, values: w)).backward()
        var worst = 0.0
        for (key, p) in params {
            guard let grad = p.grad else { Issue.record("\(name): \(key) got no gradient"); continue }
            for i in 0..<p.count {
                let saved = p.pointer[i]
                let h: Float = 1e-2
                p.pointer[i] = saved + h
                let up = value()
                p.pointer[i] = saved - h
                let down = value()
                p.pointer[i] = saved
                worst = worse(worst, abs(Double(grad.pointer[i]) - (up - down) / Double(2 * h)) / max(1, abs((up - down) / Double(2 * h))))
            }
        }
        #expect(worst < 2e-3, "\(name): worst gradient error \(worst)")
    }

    @Test func lnTuningAndTrainableTokens() throws {
        var rng = GraftRNG(seed: 5)
        let norm = LayerNorm(weight: Tensor.randomNormal([6], rng: &rng), bias: Tensor.randomNormal([6], rng: &rng), eps: 1e-5)
        let table = Embedding(weight: Tensor.randomNormal([10, 6], rng: &rng))
        let root = ModuleList(typeName: "Toy", [("LayerNorm", norm), ("embed", table)])
        let model = AdaptedModel(root: root)
        let ln = try model.addAdapter("ln", config: AdapterConfig(jsonText: #"{"peft_type":"LN_TUNING","target_modules":["LayerNorm"]}"#, source: "ln"))
        let x = Tensor.randomNormal([3, 6], rng: &rng)
        check("LN tuning", params: ln.peftStateDict.map { ($0.key, $0.tensor) }) { norm.forward(x) }
        let tokens = try model.addAdapter("tok", config: AdapterConfig(jsonText: #"{"peft_type":"TRAINABLE_TOKENS","target_modules":["embed"],"token_indices":[2,7]}"#, source: "tok"))
        for (_, p) in tokens.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 } }
        check("trainable tokens", params: tokens.peftStateDict.map { ($0.key, $0.tensor) }) { table.forward([1, 2, 7, 2, 9]) }
        #expect(throws: GraftError.self) {
            try model.addAdapter("bad", config: AdapterConfig(jsonText: #"{"peft_type":"TRAINABLE_TOKENS","target_modules":["embed"],"token_indices":[10]}"#, source: "bad"))
        }
    }
}

@Suite struct PromptGradientTests {
    /// Prompt and prefix tuning on the real MiniLM: sampled entries against central differences.
    @Test(arguments: ["PROMPT_TUNING", "PREFIX_TUNING"])
    func promptLearningGradients(type: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("p", config: AdapterConfig(jsonText: #"{"peft_type":"\#(type)","num_virtual_tokens":3}"#, source: "p"))
        guard let prompt = adapter.peftStateDict.first?.tensor else { Issue.record("no prompt tensor"); return }
        #expect(adapter.peftStateDict.first?.key == "prompt_embeddings")
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 102], [101, 2023, 102]])
        var rng = GraftRNG(seed: 2)
        let w = Tensor.randomNormal([2, type == "PROMPT_TUNING" ? 7 : 4, 384], rng: &rng)
        func value() throws -> Double {
            let out = try withNoGrad { try bert.forward(batch) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(try bert.forward(batch) * w).backward()
        guard let grad = prompt.grad else { Issue.record("no gradient for the prompt"); return }
        var worst = 0.0
        for i in stride(from: 0, to: prompt.count, by: 97) {
            let saved = prompt.pointer[i]
            prompt.pointer[i] = saved + 1e-2
            let up = try value()
            prompt.pointer[i] = saved - 1e-2
            let down = try value()
            prompt.pointer[i] = saved
            let numeric = (up - down) / 2e-2
            worst = worse(worst, abs(Double(grad.pointer[i]) - numeric) / max(1, abs(numeric)))
        }
        #expect(worst < 5e-3, "\(type): worst gradient error \(worst)")
        #expect(throws: GraftError.self) { try model.merge("p") }
    }
}

@Suite struct PTuningEncoderTests {
    /// P-tuning's MLP encoder trains (its parameters' gradients match central differences) and saves its output
    /// as PEFT does, which reloads (as plain virtual tokens) to the same model output.
    @Test func encoderGradientsAndSaveAsPEFTOutput() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("p", config: AdapterConfig(
            jsonText: #"{"peft_type":"P_TUNING","num_virtual_tokens":3,"encoder_hidden_size":16}"#, source: "p"))
        #expect(adapter.peftStateDict.map(\.key) == ["prompt_encoder.embedding.weight"] + (0..<3).flatMap {
            ["prompt_encoder.mlp_head.\(2 * $0).weight", "prompt_encoder.mlp_head.\(2 * $0).bias"]
        })
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 102], [101, 2023, 102]])
        var rng = GraftRNG(seed: 4)
        let w = Tensor.randomNormal([2, 7, 384], rng: &rng)
        func value() throws -> Double {
            let out = try withNoGrad { try bert.forward(batch) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(try bert.forward(batch) * w).backward()
        // The MLP's ReLUs make the objective only piecewise smooth, and float32 forward passes over 5k outputs carry
        // ~4e-5 of noise in each value: a step of 2e-3 left ~1e-2 of noise in the differences (0.0202 seen against
        // 2e-2 on an Intel Xeon). A step of 1e-2 divides that noise by 5; entries whose one-sided slopes disagree (a
        // ReLU switching inside the step) are skipped as kinks, and only a few may be.
        let check = try finiteDifferenceCheck(adapter.peftStateDict, step: 1e-2, samples: 5, skipKinks: true, report: 2e-2, value: value)
        print("P-tuning encoder gradients: worst relative error \(check.worst), \(check.kinks) kinks skipped")
        #expect(check.missing.isEmpty, "P-tuning encoder: no gradient for \(check.missing)")
        #expect(check.worst < 2e-2, "P-tuning encoder: worst gradient error \(check.worst)")
        #expect(check.kinks <= 10, "P-tuning encoder: \(check.kinks) entries skipped as kinks")

        let expected = try withNoGrad { try bert.forward(batch) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-ptuning-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("p", directory: dir)
        let file = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        #expect(file.names == ["prompt_embeddings"], "PEFT's file holds the encoder output only")
        try model.deleteAdapter("p")
        let reloaded = AdaptedModel(root: bert)
        try reloaded.loadAdapter(directory: dir, name: "p")
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, expected) < 1e-5)
        try reloaded.deleteAdapter("p")
    }
}

@Suite(.serialized) struct DecoderPromptTuningTests {
    /// Virtual tokens equal to the embeddings of real tokens `p` make the decoder compute exactly what it computes
    /// on `p + x` (positions, causal attention, cache), for the forward pass and for greedy generation.
    @Test func virtualTokensActLikeAPrependedPrompt() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        let prefix: [Int32] = [1, 9690, 198]            // "<|im_start|>system\n"
        let text: [Int32] = [504, 3458, 282, 4649, 314]
        let adapter = try model.addAdapter("p", config: AdapterConfig(json: ["peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3], source: "p"))
        let prompt = try #require(adapter.peftStateDict.first?.tensor)
        let h = llama.config.hiddenSize
        for (i, id) in prefix.enumerated() {
            (prompt.pointer + i * h).update(from: llama.embedTokens.weight.pointer + Int(id) * h, count: h)
        }
        let withPrompt = try withNoGrad { try llama.hiddenStates(TokenBatch(ids: text, batchSize: 1, length: text.count)) }
        model.setAdaptersDisabled(true)
        let full = try withNoGrad { try llama.hiddenStates(TokenBatch(ids: prefix + text, batchSize: 1, length: prefix.count + text.count)) }
        let expected = full.slice(dim: 1, prefix.count..<(prefix.count + text.count))
        // Final hidden states reach ~50 here: the bound is relative to their scale (float32 rounding of other GEMM shapes).
        #expect(maxAbsDifference(withPrompt, expected) < 1e-5 * (expected.scalars.map(abs).max() ?? 1))
        let plain = try llama.generate(prompt: prefix + text, parameters: GenerationParameters(maxNewTokens: 6))
        model.setAdaptersDisabled(false)
        let prompted = try llama.generate(prompt: text, parameters: GenerationParameters(maxNewTokens: 6))
        #expect(prompted == plain, "generation under the prompt adapter \(prompted) vs with the prompt written out \(plain)")
        try model.deleteAdapter("p")
    }

    /// Prefix keys and values equal to what the decoder caches for real tokens `p` make it compute exactly what it
    /// computes on `p + x`: prefixes act as cached, already-rotated keys, later tokens take positions `n...`.
    @Test func prefixesActLikeCachedTokens() throws {
        let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
        let model = AdaptedModel(root: llama)
        let prefix: [Int32] = [1, 9690, 198]
        let text: [Int32] = [504, 3458, 282, 4649, 314]
        let cache = KVCache(layerCount: llama.layers.count)
        _ = try withNoGrad { try llama.hiddenStates(TokenBatch(ids: prefix, batchSize: 1, length: prefix.count), cache: cache) }
        let adapter = try model.addAdapter("p", config: AdapterConfig(json: ["peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3], source: "p"))
        let table = try #require(adapter.peftStateDict.first?.tensor)
        let w = llama.prefixWidth, layers = llama.config.layers
        #expect(w == 192 && table.shape == [3, layers * 2 * w], "PEFT's token_dim under grouped-query attention")
        for l in 0..<layers {
            let keys = try #require(cache.layers[l].keys), values = try #require(cache.layers[l].values)
            for t in 0..<prefix.count {
                (table.pointer + t * layers * 2 * w + 2 * l * w).update(from: keys.pointer + t * w, count: w)
                (table.pointer + t * layers * 2 * w + (2 * l + 1) * w).update(from: values.pointer + t * w, count: w)
            }
        }
        let withPrefix = try withNoGrad { try llama.hiddenStates(TokenBatch(ids: text, batchSize: 1, length: text.count)) }
        model.setAdaptersDisabled(true)
        let full = try withNoGrad { try llama.hiddenStates(TokenBatch(ids: prefix + text, batchSize: 1, length: prefix.count + text.count)) }
        let expected = full.slice(dim: 1, prefix.count..<(prefix.count + text.count))
        // Final hidden states reach ~50 here: the bound is relative to their scale (float32 rounding of other GEMM shapes).
        let scale = expected.scalars.map(abs).max() ?? 1
        #expect(maxAbsDifference(withPrefix, expected) < 1e-5 * scale)
        let plain = try llama.generate(prompt: prefix + text, parameters: GenerationParameters(maxNewTokens: 6))
        model.setAdaptersDisabled(false)
        let prefixed = try llama.generate(prompt: text, parameters: GenerationParameters(maxNewTokens: 6))
        #expect(prefixed == plain, "generation under the prefix adapter \(prefixed) vs with the prefix written out \(plain)")
        // Two rows of different lengths in one padded batch train: every row attends to the prefix.
        let batch = try TokenBatch(sequences: [text, Array(text.prefix(3))])
        let two = try llama.hiddenStates(batch)
        sum(two).backward()
        #expect(table.grad != nil)
        #expect(maxAbsDifference(two.slice(dim: 0, 0..<1), withPrefix) < 1e-5 * scale)
        try model.deleteAdapter("p")
    }
}

/// FourierFT's ΔW against its definition, `ΔW[p, q] = scaling/(out·in) · Σₖ cₖ cos(2π(p uₖ/out + q vₖ/in))` summed in
/// Float64, in both of the layer's forms: rank-`n` products (few frequencies) and the 2-D transform of the sparse
/// spectrum (many), and the forward pass equal to `x (W + ΔW)ᵀ + b`.
@Suite struct FourierFTDefinitionTests {
    @Test(arguments: [(12, false), (48, true)])
    func deltaFollowsTheDefinition(frequencies: Int, transform: Bool) throws {
        var rng = GraftRNG(seed: 7)
        let (inF, outF, scaling) = (8, 8, 20.0)
        let weight = Tensor.randomNormal([outF, inF], rng: &rng), bias = Tensor.randomNormal([outF], rng: &rng)
        let proj = Linear(weight: weight, bias: bias)
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: #"{"peft_type":"FOURIERFT","n_frequency":\#(frequencies),"scaling":20,"random_loc_seed":5,"target_modules":["proj"]}"#, source: "fourierft"))
        let layer = try #require(adapter.layers.first?.2 as? FourierFTLayer)
        #expect(layer.transformIsCheaper(rows: nil) == transform && layer.transformIsCheaper(rows: 3) == transform)
        for i in 0..<layer.spectrum.count { layer.spectrum.pointer[i] = rng.nextNormal() }
        let delta = withNoGrad { layer.delta() }
        var errors: [Float] = []
        for p in 0..<outF {
            for q in 0..<inF {
                var sum = 0.0
                for k in 0..<frequencies {
                    let phase = Double(p * layer.rowFrequency[k]) / Double(outF) + Double(q * layer.columnFrequency[k]) / Double(inF)
                    sum += Double(layer.spectrum.pointer[k]) * cos(2 * Double.pi * phase)
                }
                errors.append(abs(Float(sum * scaling / Double(outF * inF)) - delta.pointer[p * inF + q]))
            }
        }
        let worst = worstOf(errors, empty: .infinity)  // NaN-aware: a NaN entry makes it NaN, which fails below
        let x = Tensor.randomNormal([3, inF], rng: &rng)
        let out = withNoGrad { proj.forward(x) }
        let want = withNoGrad { linear(x, weight + delta, bias) }
        print("FourierFT n=\(frequencies) (\(transform ? "2-D transform" : "rank-n products")): ΔW vs the definition \(worst), forward vs x(W+ΔW)ᵀ+b \(maxAbsDifference(out, want))")
        #expect(worst <= 1e-5 && maxAbsDifference(out, want) <= 1e-5)
    }
}

