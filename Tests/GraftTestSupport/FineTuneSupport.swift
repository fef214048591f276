import GraftIO
import GraftModels
import GraftText
import GraftTrain

extension TrainerConfig {
    /// The short fine-tune tests' recipe: all `examples` examples in one batch, a constant `learningRate`, no weight
    /// decay, no shuffling.
    public static func fullBatch(examples: Int, learningRate: Float) -> TrainerConfig {
        var config = TrainerConfig()
        config.batchSize = examples
        config.learningRate = learningRate
        config.schedule = .constant
        config.weightDecay = 0
        config.shuffle = false
        return config
    }
}

/// SmolLM2 and the first `count` demo tweets as causal-LM completions `"Tweet: …\nSentiment:"` → `" label"`
/// (at most `maxLength` tokens each): the decoder fine-tune tests' data.
public func smolLM2TweetCompletions(count: Int = 8, maxLength: Int = 48) throws -> (llama: LlamaModel, tokenizer: BPETokenizer,
                                                                                  examples: [TokenizedExample]) {
    let llama = try LlamaModel(gguf: GGUFFile(contentsOf: try Assets.require(Assets.smollm2)))
    let tokenizer = try BPETokenizer(ggufFile: Assets.smollm2)
    let (train, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
    let completions = train.prefix(count).map {
        TextCompletion(prompt: "Tweet: \($0.text)\nSentiment:", completion: " " + TweetCorpus.labels[$0.label])
    }
    return (llama, tokenizer, try ExampleTokenizer.causalLM(completions, tokenizer: tokenizer, maxLength: maxLength))
}
