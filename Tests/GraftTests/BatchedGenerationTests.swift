import Foundation
import Testing
@testable import Graft
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// Continuous batching: sequences join and leave a running batch between steps, each under its own adapter, and
/// each gets exactly the tokens it gets generating alone; KV caches are allocated once for what a request can use.
@Suite(.serialized) struct BatchedGenerationTests {
    static let prompts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "The quick brown fox",
        "Once upon a time, in a land far away,",
        "1, 2, 3,",
    ]

    /// A SmolLM2 session with two LoRA adapters moved off their initial (identity) values.
    static func session() throws -> GraftSession {
        let s = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        try s.addAdapter(name: "a", configJSON: #"{"peft_type": "LORA", "r": 8, "target_modules": "all-linear", "init_lora_weights": false}"#, seed: 1)
        try s.addAdapter(name: "b", configJSON: #"{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"], "init_lora_weights": false}"#, seed: 2)
        return s
    }

    /// What `prompt` generates alone under `adapter` (nil = base).
    static func alone(_ s: GraftSession, _ prompt: [Int32], adapter: String?, _ params: GenerationParameters) throws -> [Int32] {
        if let adapter {
            try s.adapted.setActiveAdapter(adapter)
            s.adapted.setAdaptersDisabled(false)
        } else {
            s.adapted.setAdaptersDisabled(true)
        }
        defer { s.adapted.setAdaptersDisabled(false) }
        return try s.generate(prompt: prompt, parameters: params, stopAtEOS: false) { _, _ in true }
    }

    /// In the fast mode the steps run inside one int8-copies scope held across steps, as graftd holds it.
    @Test(arguments: [false, true])
    func sequencesJoiningMidwayGetTheirAloneTokens(fast: Bool) throws {
        let s = try Self.session()
        let prompts = Self.prompts.map { s.model.tokenizer.encode($0) }
        let adapters: [String?] = ["a", nil, "b", "a"]
        let params = GenerationParameters(maxNewTokens: 12, fastDecode: fast)
        let copies = fast ? Int8FactorCopies() : nil
        var running: [(index: Int, generation: BatchedGeneration)] = []
        var streamed = [[Int32]](repeating: [], count: prompts.count)
        var joined = 0
        // One request joins every third step: prefills and decodes of different sequences interleave.
        for step in 0..<200 {
            if step % 3 == 0, joined < prompts.count {
                let g = try #require(try s.prepareBatchedGeneration(prompt: prompts[joined], parameters: params, stopAtEOS: false,
                                                                    adapter: adapters[joined] ?? "", contextLimit: nil, prefixCache: nil))
                running.append((joined, g))
                joined += 1
            }
            if running.isEmpty {
                if joined == prompts.count { break }
                continue
            }
            // The fast mode steps prompts and decoding rows apart, as graftd does: int8 rounding turns the last digits
            // in which a decoding row's attention differs when padded beside a prompt into other tokens.
            let prefilling = running.filter { $0.generation.sequence.isPrefilling }
            let rows = fast && !prefilling.isEmpty && prefilling.count < running.count
                ? (step % 2 == 0 ? prefilling : running.filter { !$0.generation.sequence.isPrefilling }) : running
            let pieces = try withInt8FactorCopies(copies) { try s.step(rows.map(\.generation)) }
            for ((i, _), piece) in zip(rows, pieces) where piece.reported { streamed[i].append(piece.token) }
            running.removeAll { $0.generation.isFinished }
        }
        if let copies { #expect(copies.bytes > 0, "the fast steps made no int8 copies") }
        for (i, prompt) in prompts.enumerated() {
            let expected = try Self.alone(s, prompt, adapter: adapters[i], params)
            #expect(streamed[i] == expected, "prompt \(i) under \(adapters[i] ?? "base"), fast \(fast)")
            #expect(streamed[i].count == 12)
        }
    }

    @Test func aSharedPromptPrefixIsCopiedNotRecomputed() throws {
        let s = try Self.session()
        let cache = PromptPrefixCache(budgetBytes: 64 << 20)
        let params = GenerationParameters(maxNewTokens: 8)
        let system = "<|im_start|>system\nYou are a helpful assistant who answers briefly.<|im_end|>\n<|im_start|>user\n"
        let first = s.model.tokenizer.encode(system + "Name a colour.<|im_end|>\n<|im_start|>assistant\n")
        let second = s.model.tokenizer.encode(system + "Name a fruit.<|im_end|>\n<|im_start|>assistant\n")
        func run(_ prompt: [Int32], adapter: String) throws -> BatchedGeneration {
            let g = try #require(try s.prepareBatchedGeneration(prompt: prompt, parameters: params, stopAtEOS: false,
                                                                adapter: adapter, contextLimit: nil, prefixCache: cache))
            while !g.isFinished { _ = try s.step([g]) }
            cache.store(g)
            return g
        }
        let g1 = try run(first, adapter: "a")
        #expect(g1.reusedPrefix == 0)
        let g2 = try run(second, adapter: "a")
        let shared = zip(first, second).prefix { $0 == $1 }.count
        print("prompt cache: \(g2.reusedPrefix) of \(second.count) prompt tokens reused (shared prefix \(shared)); hits \(cache.hits), \(cache.bytes) bytes kept")
        #expect(g2.reusedPrefix == shared)
        let secondAlone = try Self.alone(s, second, adapter: "a", params)
        #expect(g2.reported == secondAlone)
        // Another adapter's keys and values differ: no reuse across adapters.
        let g3 = try run(second, adapter: "b")
        #expect(g3.reusedPrefix == 0)
        let secondAloneB = try Self.alone(s, second, adapter: "b", params)
        #expect(g3.reported == secondAloneB)
        // The same prompt again reuses all but its last token.
        let g4 = try run(second, adapter: "b")
        #expect(g4.reusedPrefix == second.count - 1)
        #expect(g4.reported == g3.reported)
    }

    @Test func theContextLimitIsCheckedUpFrontAndCachesAreSizedToTheRequest() throws {
        let s = try Self.session()
        let prompt = s.model.tokenizer.encode("The quick brown fox")
        do {
            _ = try s.prepareBatchedGeneration(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 64), stopAtEOS: false,
                                               adapter: "a", contextLimit: 32, prefixCache: nil)
            Issue.record("a request past the context limit should throw")
        } catch let e as GraftError {
            #expect(e.message.contains("context limit of 32"), "\(e.message)")
        }
        let g = try #require(try s.prepareBatchedGeneration(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 10),
                                                            stopAtEOS: false, adapter: "a", contextLimit: 32, prefixCache: nil))
        let llama = try s.taskModel.decoder()
        let perPosition = 2 * 4 * llama.config.kvHeads * llama.config.headDim * llama.layers.count
        #expect(g.sequence.cache.capacity == prompt.count + 10)
        #expect(g.sequence.cache.allocatedBytes == (prompt.count + 10) * perPosition)
        while !g.isFinished { _ = try s.step([g]) }
        #expect(g.sequence.cache.length == prompt.count + 9)
        // A fixed cache refuses positions past its capacity instead of growing.
        #expect(throws: GraftError.self) { try g.sequence.cache.reserve(2) }
        // Unknown adapters are named.
        do {
            _ = try s.prepareBatchedGeneration(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 4), stopAtEOS: false,
                                               adapter: "nope", contextLimit: nil, prefixCache: nil)
            Issue.record("an unknown adapter should throw")
        } catch let e as GraftError {
            #expect(e.message.contains("'nope'"))
        }
    }

    @Test func aGrowingCacheMatchesAPreallocatedOne() throws {
        let s = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        let llama = try s.taskModel.decoder()
        let prompt = s.model.tokenizer.encode("Once upon a time, in a land far away,")
        let width = llama.config.kvHeads * llama.config.headDim
        let fixed = KVCache(layerCount: llama.layers.count, width: width, capacity: prompt.count + 70)
        let growing = KVCache(layerCount: llama.layers.count)
        var last: [Tensor] = []
        for cache in [fixed, growing] {
            try withNoGrad {
                var h = try llama.hiddenStates(try TokenBatch(ids: prompt, batchSize: 1, length: prompt.count), cache: cache)
                // 70 single-token steps make the growing cache reallocate (64, then 128 positions).
                for step in 0..<70 {
                    h = try llama.hiddenStates(try TokenBatch(ids: [Int32(100 + step)], batchSize: 1, length: 1), cache: cache)
                }
                last.append(h)
            }
        }
        #expect(fixed.length == prompt.count + 70 && growing.length == fixed.length)
        #expect(growing.capacity == nil && fixed.allocatedBytes == (prompt.count + 70) * 2 * 4 * width * llama.layers.count)
        var worst: Float = 0
        for i in 0..<last[0].count {
            let d = abs(last[0].pointer[i] - last[1].pointer[i])
            #expect(d.isFinite)
            worst = max(worst, d)
        }
        #expect(worst == 0)
    }
}
