/// How generation picks tokens: the one definition of these options, their defaults and their checks. The C
/// ABI's `graft_sampling_params`, graftd's `Generate`, the CLI's flags and the bindings all translate into it.
public struct SamplingOptions: Sendable, Equatable {
    /// Stop after this many new tokens (0 to 1,048,576). Default 128.
    public var maxNewTokens: Int = 128
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling (finite, ≥ 0). Default 0.
    public var temperature: Float = 0
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches it, in (0, 1]. Default 1.
    public var topP: Float = 1
    /// Keep only the `topK` most likely tokens (0 = all, ≥ 0). Default 0.
    public var topK: Int = 0
    /// Stop at the model's end-of-sequence / end-of-turn tokens. Default true.
    public var stopAtEOS: Bool = true
    /// Seed of the sampling random number generator. Default 0.
    public var seed: UInt64 = 0
    /// The fast mode: int8 activations against a GGUF base's Q4_1 / Q8_0 weights while decoding (see
    /// ``GenerationParameters/fastDecode``). Default false (exact).
    public var fastDecode: Bool = false

    /// The largest `maxNewTokens` accepted.
    public static let maxNewTokensLimit = 1 << 20

    /// The defaults: greedy, 128 tokens, stop at end of sequence.
    public init() {}

    /// Throws naming the first field out of range.
    public func validate() throws {
        guard maxNewTokens >= 0, maxNewTokens <= Self.maxNewTokensLimit else {
            throw GraftError.invalid("max_new_tokens must be in 0...\(Self.maxNewTokensLimit), got \(maxNewTokens)")
        }
        guard temperature >= 0, temperature.isFinite else {
            throw GraftError.invalid("temperature must be ≥ 0 and finite (0 = greedy), got \(temperature)")
        }
        guard topP > 0, topP <= 1 else { throw GraftError.invalid("top_p must be in (0, 1] (1 = all tokens), got \(topP)") }
        guard topK >= 0 else { throw GraftError.invalid("top_k must be ≥ 0 (0 = all tokens), got \(topK)") }
    }

    /// The engine's parameters, with the stop tokens the model defines when ``stopAtEOS`` holds.
    public func generationParameters(stopTokens: Set<Int32>) -> GenerationParameters {
        GenerationParameters(maxNewTokens: maxNewTokens, temperature: temperature, topP: topP, topK: topK, seed: seed,
                             stopTokens: stopAtEOS ? stopTokens : [], fastDecode: fastDecode)
    }
}
