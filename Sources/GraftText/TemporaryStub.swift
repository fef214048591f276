// Temporary stand-in until the tokenizers land; removed at merge.
import GraftIO
import GraftTensor
public protocol Tokenizer: Sendable {
    func encode(_ text: String, addSpecialTokens: Bool) -> [Int32]
    func decode(_ ids: [Int32], skipSpecialTokens: Bool) -> String
    var vocabularySize: Int { get }
    func id(of token: String) -> Int32?
    var eosId: Int32? { get }
}
public final class WordPieceTokenizer: Tokenizer {
    public init(vocabFile: String) throws {}
    public func encode(_ text: String, addSpecialTokens: Bool) -> [Int32] { [] }
    public func decode(_ ids: [Int32], skipSpecialTokens: Bool) -> String { "" }
    public var vocabularySize: Int { 30522 }
    public func id(of token: String) -> Int32? { nil }
    public var eosId: Int32? { nil }
}
public final class BPETokenizer: Tokenizer {
    public init(gguf: [String: GGUFValue]) throws {}
    public func encode(_ text: String, addSpecialTokens: Bool) -> [Int32] { [] }
    public func decode(_ ids: [Int32], skipSpecialTokens: Bool) -> String { "" }
    public var vocabularySize: Int { 49152 }
    public func id(of token: String) -> Int32? { nil }
    public var eosId: Int32? { nil }
}
