import GraftTensor

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How ``LlamaModel/generate(prompt:parameters:onToken:)`` picks each next token.
public struct GenerationParameters: Sendable {
    /// Stop after this many new tokens.
    public var maxNewTokens: Int = 128
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    public var temperature: Float = 0
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `topP` (1 = all).
    public var topP: Float = 1
    /// Keep only the `topK` most likely tokens (0 = all).
    public var topK: Int = 0
    /// Seed of the sampling RNG.
    public var seed: UInt64 = 0
    /// Generation stops after emitting any of these (the model's end-of-turn / EOS tokens).
    public var stopTokens: Set<Int32> = []
    /// The fast mode: every product with a Q4_1 / Q8_0 weight of a GGUF base (the prompt's and each decoding
    /// step's) multiplies activations quantized to int8 per block of 32 (integer dot products, as llama.cpp does)
    /// instead of float32 activations, and plain LoRA updates of decoding rows read int8 copies of their factors
    /// (a scale per rank component). Logits then deviate slightly from the exact mode (the default, false); other weights are
    /// unaffected. A row's products do not depend on the rows beside it, so a sequence gets the same tokens alone
    /// or batched with other prompts or decoding rows. A decoding row padded beside a prompt in one
    /// step is the exception: its attention differs in the last digits, which int8 rounding can turn into other
    /// tokens, so graftd steps prompts and decoding rows apart. Prompt caching is off in this mode.
    public var fastDecode: Bool = false

    /// Defaults: greedy, 128 tokens, no stop tokens, exact mode.
    public init(maxNewTokens: Int = 128, temperature: Float = 0, topP: Float = 1, topK: Int = 0, seed: UInt64 = 0,
                stopTokens: Set<Int32> = [], fastDecode: Bool = false) {
        self.maxNewTokens = maxNewTokens
        self.temperature = temperature
        self.topP = topP
        self.topK = topK
        self.seed = seed
        self.stopTokens = stopTokens
        self.fastDecode = fastDecode
    }

    /// Throws on values outside their ranges, naming the field.
    public func validate() throws {
        guard maxNewTokens >= 0 else { throw GraftError.invalid("maxNewTokens must be ≥ 0, got \(maxNewTokens)") }
        guard temperature >= 0, temperature.isFinite else { throw GraftError.invalid("temperature must be ≥ 0, got \(temperature)") }
        guard topP > 0, topP <= 1 else { throw GraftError.invalid("topP must be in (0, 1], got \(topP)") }
        guard topK >= 0 else { throw GraftError.invalid("topK must be ≥ 0, got \(topK)") }
    }
}

/// Picks tokens from logits: greedy, or temperature / top-k / top-p sampling with a seeded RNG.
public struct TokenSampler {
    let parameters: GenerationParameters
    var rng: GraftRNG

    /// A sampler seeded from `parameters.seed`.
    public init(parameters: GenerationParameters) {
        self.parameters = parameters
        self.rng = GraftRNG(seed: parameters.seed)
    }

    /// The next token for one row of logits.
    public mutating func sample(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
        let n = logits.count
        if parameters.temperature == 0 {
            var best = 0
            for i in 1..<n where logits[i] > logits[best] { best = i }
            return Int32(best)
        }
        var order = Array(0..<n)
        order.sort { logits[$0] > logits[$1] }
        if parameters.topK > 0 { order = Array(order.prefix(parameters.topK)) }
        let m = logits[order[0]]
        var probs = order.map { expf((logits[$0] - m) / parameters.temperature) }
        let total = probs.reduce(0, +)
        for i in probs.indices { probs[i] /= total }
        if parameters.topP < 1 {
            var cumulative: Float = 0
            var keep = probs.count
            for (i, p) in probs.enumerated() {
                cumulative += p
                if cumulative >= parameters.topP { keep = i + 1; break }
            }
            probs = Array(probs.prefix(keep))
            order = Array(order.prefix(keep))
            let s = probs.reduce(0, +)
            for i in probs.indices { probs[i] /= s }
        }
        let u = rng.nextUniform()
        var c: Float = 0
        for (i, p) in probs.enumerated() {
            c += p
            if u < c { return Int32(order[i]) }
        }
        return Int32(order[order.count - 1])
    }
}

extension LlamaModel {
    /// Generates up to `parameters.maxNewTokens` tokens after `prompt` with a KV cache.
    ///
    /// `onToken` sees each new token as it is chosen; returning `false` stops generation. The returned array
    /// holds the new tokens only (including a final stop token, if one was produced).
    public func generate(
        prompt: [Int32], parameters: GenerationParameters = GenerationParameters(),
        onToken: (Int32) -> Bool = { _ in true }
    ) throws -> [Int32] {
        try parameters.validate()
        guard !prompt.isEmpty else { throw GraftError.invalid("generate: the prompt is empty") }
        guard prompt.count + parameters.maxNewTokens <= config.contextLength else {
            throw GraftError.invalid("generate: prompt (\(prompt.count)) + maxNewTokens (\(parameters.maxNewTokens)) exceeds the context length \(config.contextLength)")
        }
        return try withNoGrad { try withInt8Activations(parameters.fastDecode) { try withInt8FactorCopies(true) {
            let cache = KVCache(layerCount: layers.count)
            var sampler = TokenSampler(parameters: parameters)
            var generated: [Int32] = []
            var input = prompt
            while generated.count < parameters.maxNewTokens {
                let batch = try TokenBatch(ids: input, batchSize: 1, length: input.count)
                let hidden = try hiddenStates(batch, cache: cache)
                let last = hidden.slice(dim: 1, (input.count - 1)..<input.count).reshaped([1, config.hiddenSize])
                let logits = lmHead.forward(last)
                let next = sampler.sample(UnsafeBufferPointer(logits.buffer))
                generated.append(next)
                if !onToken(next) || parameters.stopTokens.contains(next) { break }
                input = [next]
            }
            return generated
        } } }
    }

    /// Generates after each of `prompts` as one batch: each prompt is prefilled in a step of its own, as it is alone
    /// (a GEMM may round a row differently depending on how many rows it multiplies), then every decoding step runs
    /// the still-active sequences together, each with its own KV cache and its own sampler seeded from
    /// `parameters.seed`.
    ///
    /// `around(rows, step)` wraps every forward step: `rows` are the indices (into `prompts`, ascending) of the
    /// sequences in that step's batch, and `step()` returns their next-token logits `[rows.count, vocab]`
    /// (mixed-adapter routing installs itself here). `onToken(sequence, token)` returning false stops that
    /// sequence. Returns the new tokens per prompt (including a final stop token, if produced).
    public func generate(
        prompts: [[Int32]], parameters: GenerationParameters = GenerationParameters(),
        around: (_ rows: [Int], _ step: () throws -> Tensor) throws -> Tensor = { try $1() },
        onToken: (_ sequence: Int, _ token: Int32) -> Bool = { _, _ in true }
    ) throws -> [[Int32]] {
        try parameters.validate()
        for (i, p) in prompts.enumerated() {
            guard !p.isEmpty else { throw GraftError.invalid("generate: prompt \(i) is empty") }
            guard p.count + parameters.maxNewTokens <= config.contextLength else {
                throw GraftError.invalid("generate: prompt \(i) (\(p.count)) + maxNewTokens (\(parameters.maxNewTokens)) exceeds the context length \(config.contextLength)")
            }
        }
        let sequences = try prompts.map {
            try GenerationSequence(pending: $0, cache: KVCache(layerCount: layers.count), parameters: parameters)
        }
        var active = sequences.indices.filter { !sequences[$0].isFinished }
        try withInt8FactorCopies(true) {
            while !active.isEmpty {
                let prefilling = active.filter { sequences[$0].isPrefilling }
                let rows = prefilling.isEmpty ? active : [prefilling[0]]
                let tokens = try decodeStep(rows.map { sequences[$0] }) { step in
                    try withoutActuallyEscaping(step) { try around(rows, $0) }
                }
                for (r, token) in zip(rows, tokens) where !onToken(r, token) { sequences[r].finish() }
                active = active.filter { !sequences[$0].isFinished }
            }
        }
        return sequences.map(\.generated)
    }
}
