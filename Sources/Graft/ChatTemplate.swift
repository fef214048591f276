import GraftText

/// A model's chat format, recognised from its vocabulary: the markers a template wraps turns in are tokens of
/// the model, so the template follows from the tokenizer rather than from a model name. Graft knows ChatML
/// (`<|im_start|>role\n … <|im_end|>`), the format of SmolLM2, Qwen and other instruct decoders.
public struct ChatTemplate: Sendable {
    /// The chat formats Graft can apply.
    public enum Format: String, Sendable {
        /// `<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n`.
        case chatML = "chatml"
    }

    /// The model's format.
    public let format: Format

    /// The template of the model whose tokenizer is `tokenizer`; throws naming `source` when its vocabulary
    /// holds no chat markers Graft knows.
    public init(tokenizer: any Tokenizer, source: String) throws {
        guard tokenizer.id(of: "<|im_start|>") != nil, tokenizer.id(of: "<|im_end|>") != nil else {
            throw GraftError(.unsupported, "\(source): the model's vocabulary has no chat markers Graft knows (ChatML's <|im_start|>, <|im_end|>); send the prompt as is")
        }
        format = .chatML
    }

    /// `user` as the single user turn, followed by the opening of the assistant's turn.
    public func prompt(user: String) -> String {
        switch format {
        case .chatML: return "<|im_start|>user\n\(user)<|im_end|>\n<|im_start|>assistant\n"
        }
    }

    /// The tokens that end a turn or the text for `tokenizer`'s model: end of sequence, and the chat formats'
    /// end-of-turn markers where the vocabulary has them.
    public static func stopTokens(_ tokenizer: any Tokenizer) -> Set<Int32> {
        var stops = Set(["<|im_end|>", "<|endoftext|>"].compactMap { tokenizer.id(of: $0) })
        if let eos = tokenizer.eosTokenId { stops.insert(eos) }
        return stops
    }
}
