/// A text tokenizer: turns text into token ids and back.
///
/// Conforming types are immutable after construction (any internal cache is synchronised), so one
/// instance can be shared across threads.
public protocol Tokenizer: Sendable {
    /// Encodes `text` into token ids.
    ///
    /// - Parameters:
    ///   - text: the text to encode; any Swift `String` is accepted.
    ///   - addSpecialTokens: whether to add the model's template tokens (for BERT: `[CLS]` … `[SEP]`;
    ///     byte-level BPE adds none unless configured to add a BOS token).
    /// - Returns: the token ids.
    func encode(_ text: String, addSpecialTokens: Bool) -> [Int32]

    /// Decodes token ids back into text.
    ///
    /// Ids outside `0..<vocabularySize` are ignored: decoding never traps on user-supplied ids.
    /// - Parameters:
    ///   - ids: the token ids.
    ///   - skipSpecialTokens: whether to leave special tokens (CLS/SEP/PAD/…, control tokens) out.
    func decode(_ ids: [Int32], skipSpecialTokens: Bool) -> String

    /// The number of tokens in the vocabulary (ids run from 0 to `vocabularySize - 1`).
    var vocabularySize: Int { get }

    /// The id of the vocabulary entry spelled exactly `token`, or nil if there is none.
    func id(of token: String) -> Int32?

    /// The vocabulary entry for `id` as stored in the vocabulary, or nil if `id` is out of range.
    func token(of id: Int32) -> String?

    /// The beginning-of-sequence token id, if the model has one.
    var bosTokenId: Int32? { get }
    /// The end-of-sequence token id, if the model has one.
    var eosTokenId: Int32? { get }
    /// The padding token id, if the model has one.
    var padTokenId: Int32? { get }
    /// The unknown-token id, if the model has one.
    var unkTokenId: Int32? { get }
    /// The classification token id (BERT's `[CLS]`), if the model has one.
    var clsTokenId: Int32? { get }
    /// The separator token id (BERT's `[SEP]`), if the model has one.
    var sepTokenId: Int32? { get }
}

extension Tokenizer {
    /// Encodes `text` with the model's special tokens added.
    public func encode(_ text: String) -> [Int32] { encode(text, addSpecialTokens: true) }

    /// Decodes `ids`, keeping special tokens.
    public func decode(_ ids: [Int32]) -> String { decode(ids, skipSpecialTokens: false) }

    /// Defaults to nil for tokenizers without a beginning-of-sequence token.
    public var bosTokenId: Int32? { nil }
    /// Defaults to nil for tokenizers without an end-of-sequence token.
    public var eosTokenId: Int32? { nil }
    /// Defaults to nil for tokenizers without a padding token.
    public var padTokenId: Int32? { nil }
    /// Defaults to nil for tokenizers without an unknown token.
    public var unkTokenId: Int32? { nil }
    /// Defaults to nil for tokenizers without a classification token.
    public var clsTokenId: Int32? { nil }
    /// Defaults to nil for tokenizers without a separator token.
    public var sepTokenId: Int32? { nil }
}
