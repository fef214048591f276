import Foundation
import Testing
import GraftIO
import GraftTensor
@testable import GraftText

/// The SmolLM2 tokenizer, loaded once from the GGUF through GraftIO's `GGUFFile`.
enum SmolLM2 {
    static let relativePath = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    static let loaded: Result<BPETokenizer, any Error>? = {
        let path = TextTestSupport.graftHome + "/" + relativePath
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        return Result { try BPETokenizer(ggufFile: path) }
    }()

    /// The tokenizer, or nil after recording a failure (missing asset → run scripts/fetch-assets).
    static func tokenizer(sourceLocation: SourceLocation = #_sourceLocation) throws -> BPETokenizer? {
        guard TextTestSupport.asset(relativePath, sourceLocation: sourceLocation) != nil else { return nil }
        guard let loaded else { return nil }
        return try loaded.get()
    }
}

@Suite struct BPEFixtureTests {
    @Test func smolLM2MatchesHuggingFace() throws {
        guard let tokenizer = try SmolLM2.tokenizer() else { return }
        let cases = try TextTestSupport.cases("smollm2_bpe")
        #expect(cases.count == 51)
        let matched = TextTestSupport.compare(cases, label: "smollm2_bpe (GGUF)") {
            tokenizer.encode($0, addSpecialTokens: true)
        }
        #expect(matched == cases.count)
    }

    @Test func smolLM2DecodeRoundTripsEveryFixtureText() throws {
        guard let tokenizer = try SmolLM2.tokenizer() else { return }
        for c in try TextTestSupport.cases("smollm2_bpe") {
            #expect(tokenizer.decode(c.ids, skipSpecialTokens: false) == c.text)
        }
    }

    @Test func smolLM2Metadata() throws {
        guard let t = try SmolLM2.tokenizer() else { return }
        #expect(t.vocabularySize == 49152)
        #expect(t.preTokenizer == .gpt2IndividualDigits)
        #expect(t.bosTokenId == 1)
        #expect(t.eosTokenId == 2)
        #expect(t.unkTokenId == 0)
        #expect(t.padTokenId == 2)
        #expect(t.addBosToken == false)
        #expect(t.id(of: "<|im_start|>") == 1)
        #expect(t.token(of: 2) == "<|im_end|>")
        #expect(t.token(of: -1) == nil)
        #expect(t.token(of: 49152) == nil)
    }

    @Test func chatTemplateSpecialTokens() throws {
        guard let t = try SmolLM2.tokenizer() else { return }
        let text = "<|im_start|>user\nhi<|im_end|>"
        let ids = t.encode(text, addSpecialTokens: false)
        #expect(ids.first == 1, "<|im_start|> must encode as the single id 1: \(ids)")
        #expect(ids.last == 2, "<|im_end|> must encode as the single id 2: \(ids)")
        #expect(ids.filter { $0 == 1 || $0 == 2 }.count == 2)
        #expect(t.decode(Array(ids.dropFirst().dropLast()), skipSpecialTokens: false) == "user\nhi")
        #expect(t.decode(ids, skipSpecialTokens: false) == text)
        #expect(t.decode(ids, skipSpecialTokens: true) == "user\nhi")
        // No BOS by default, with or without special tokens.
        #expect(t.encode("hi", addSpecialTokens: true) == t.encode("hi", addSpecialTokens: false))
        // Adjacent and repeated special tokens.
        let specials: [Int32] = [2, 1, 0]
        #expect(t.encode("<|im_end|><|im_start|><|endoftext|>", addSpecialTokens: false) == specials)
    }

    @Test func roundTripsArbitraryText() throws {
        guard let t = try SmolLM2.tokenizer() else { return }
        for text in ["", "x", "Hello, world!", "  leading and trailing  ", "tabs\t\tand\r\nCRLF",
                     "ünïcödé ß 北京 🙂🚀 \u{200B}", "digits 0123456789 ٣٤٥ ⅷ", "it's we'll they're I'M",
                     String(repeating: "ab", count: 500)] {
            #expect(t.decode(t.encode(text, addSpecialTokens: false), skipSpecialTokens: false) == text)
        }
        // Cached and uncached encodes agree.
        let first = t.encode("repeat repeat repeat", addSpecialTokens: false)
        #expect(t.encode("repeat repeat repeat", addSpecialTokens: false) == first)
    }

    @Test func decodeIsLossyOnInvalidUTF8() throws {
        guard let t = try SmolLM2.tokenizer() else { return }
        // "🙂" is four bytes; dropping its last token leaves an incomplete sequence.
        let ids = t.encode("🙂", addSpecialTokens: false)
        #expect(ids.count > 1)
        let partial = t.decode(Array(ids.dropLast()), skipSpecialTokens: false)
        #expect(partial.unicodeScalars.allSatisfy { $0 == "\u{FFFD}" })
        #expect(t.decode([-5, 1_000_000], skipSpecialTokens: false) == "")
    }
}

@Suite struct BPEUnitTests {
    /// A toy byte-level vocabulary: all 256 byte characters, then merged tokens, then two control tokens.
    static func toy(pre: PreTokenizer = .gpt2) throws -> BPETokenizer {
        var tokens = (0..<256).map { String(ByteLevel.byteToScalar[$0]) }
        let merged = ["ab", "abc", "Ġa", "Ġab", "12"]
        tokens += merged
        tokens += ["<s>", "</s>"]
        var types = [Int32](repeating: 1, count: tokens.count)
        types[tokens.count - 2] = 3
        types[tokens.count - 1] = 3
        return try BPETokenizer(
            tokens: tokens, merges: ["a b", "ab c", "Ġ a", "Ġa b", "1 2"], tokenTypes: types,
            bosId: Int32(tokens.count - 2), eosId: Int32(tokens.count - 1), unkId: nil, padId: nil,
            preTokenizer: pre)
    }

    @Test func mergesByRank() throws {
        let t = try Self.toy()
        // Ids: bytes 0..<256, then ab=256, abc=257, Ġa=258, Ġab=259, 12=260, <s>=261, </s>=262.
        #expect(t.id(of: "abc") == 257)
        #expect(t.id(of: "<s>") == 261)
        let abc: [Int32] = [257]
        #expect(t.encode("abc", addSpecialTokens: false) == abc)
        // " ab": "a b" (rank 0) wins over "Ġ a" (rank 2), and "Ġ ab" is no merge.
        let abab: [Int32] = [256, 256, 32, 256]
        #expect(t.encode("abab ab", addSpecialTokens: false) == abab)
        let wrapped: [Int32] = [261, 257, 262]
        #expect(t.encode("<s>abc</s>", addSpecialTokens: false) == wrapped)
        // "aab": merge "a b" at the right, not "a a".
        let aab: [Int32] = [97, 256]
        #expect(t.encode("aab", addSpecialTokens: false) == aab)
        let spaceA: [Int32] = [258, 258]
        #expect(t.encode(" a a", addSpecialTokens: false) == spaceA)
        #expect(t.decode(t.encode("<s>abc</s>", addSpecialTokens: false), skipSpecialTokens: true) == "abc")
    }

    @Test func bosAndEosOnlyWhenConfigured() throws {
        let t = try Self.toy()
        let a: [Int32] = [97], bosA: [Int32] = [256, 97]
        #expect(t.encode("a", addSpecialTokens: true) == a)
        let tokens = (0..<256).map { String(ByteLevel.byteToScalar[$0]) } + ["<s>"]
        let withBos = try BPETokenizer(tokens: tokens, merges: [], tokenTypes: nil, bosId: 256, eosId: nil,
                                       unkId: nil, padId: nil, preTokenizer: .gpt2, addBosToken: true)
        #expect(withBos.encode("a", addSpecialTokens: true) == bosA)
        #expect(withBos.encode("a", addSpecialTokens: false) == a)
    }

    @Test func bytesWithoutTokensAreDropped() throws {
        // Only "a", "b" and "ab": the space and "x" bytes have no token; "a x b" still merges to "ab".
        let t = try BPETokenizer(tokens: ["a", "b", "ab"], merges: ["a b"], tokenTypes: nil, bosId: nil,
                                 eosId: nil, unkId: nil, padId: nil, preTokenizer: .gpt2)
        let ab: [Int32] = [2], a: [Int32] = [0]
        #expect(t.encode("axb", addSpecialTokens: false) == ab)
        #expect(t.encode("x", addSpecialTokens: false) == [])
        #expect(t.encode("a x", addSpecialTokens: false) == a)
    }

    @Test func individualDigits() throws {
        let gpt2 = try Self.toy(pre: .gpt2)
        let digits = try Self.toy(pre: .gpt2IndividualDigits)
        let twelve: [Int32] = [260], split: [Int32] = [49, 50]
        #expect(gpt2.encode("12", addSpecialTokens: false) == twelve)
        #expect(digits.encode("12", addSpecialTokens: false) == split)
    }

    @Test func gpt2PreTokenizerSplits() {
        let p = PreTokenizer.gpt2
        #expect(p.split("Hello world") == ["Hello", " world"])
        #expect(p.split("   multiple   spaces\tand") == ["  ", " multiple", "  ", " spaces", "\t", "and"])
        #expect(p.split("don't y'all WE'LL") == ["don", "'t", " y", "'", "all", " WE", "'", "LL"])
        #expect(p.split("a  ") == ["a", "  "])
        #expect(p.split(" \"quoted\"!?") == [" \"", "quoted", "\"!?"])
        #expect(p.split("abc123 4") == ["abc", "123", " 4"])
        #expect(PreTokenizer.gpt2IndividualDigits.split("abc123 4") == ["abc", "1", "2", "3", " ", "4"])
    }

    @Test func invalidInputsThrow() throws {
        let bytes = (0..<256).map { String(ByteLevel.byteToScalar[$0]) }
        func expectFormat(_ mention: String, _ body: () throws -> Void) {
            do {
                try body()
                Issue.record("expected GraftError(.format) mentioning \(mention)")
            } catch let e as GraftError {
                #expect(e.code == .format)
                #expect(e.message.contains(mention), "\(e.message)")
            } catch {
                Issue.record("unexpected error \(error)")
            }
        }
        expectFormat("\"ab\"") {
            _ = try BPETokenizer(tokens: bytes, merges: ["a b"], tokenTypes: nil, bosId: nil, eosId: nil,
                                 unkId: nil, padId: nil, preTokenizer: .gpt2)
        }
        expectFormat("merge 0") {
            _ = try BPETokenizer(tokens: bytes, merges: ["ab"], tokenTypes: nil, bosId: nil, eosId: nil,
                                 unkId: nil, padId: nil, preTokenizer: .gpt2)
        }
        expectFormat("300") {
            _ = try BPETokenizer(tokens: bytes, merges: [], tokenTypes: nil, bosId: 300, eosId: nil,
                                 unkId: nil, padId: nil, preTokenizer: .gpt2)
        }
        expectFormat("token_type") {
            _ = try BPETokenizer(tokens: bytes, merges: [], tokenTypes: [1], bosId: nil, eosId: nil,
                                 unkId: nil, padId: nil, preTokenizer: .gpt2)
        }
    }

    @Test func ggufMetadataErrors() throws {
        let bytes = (0..<256).map { GGUFValue.string(String(ByteLevel.byteToScalar[$0])) }
        var meta: [String: GGUFValue] = [
            "tokenizer.ggml.model": .string("gpt2"),
            "tokenizer.ggml.tokens": .array(bytes),
            "tokenizer.ggml.merges": .array([]),
            "tokenizer.ggml.pre": .string("smollm"),
        ]
        let ok = try BPETokenizer(gguf: meta)
        #expect(ok.preTokenizer == .gpt2IndividualDigits)
        // Vocabulary = the byte characters in byte order, so ids are bytes; digits are isolated.
        let expected: [Int32] = [104, 105, 32, 52, 50]
        #expect(ok.encode("hi 42", addSpecialTokens: true) == expected)
        #expect(ok.preTokenize("hi 42") == ["hi", " ", "4", "2"])

        meta["tokenizer.ggml.pre"] = .string("mystery-pre")
        do {
            _ = try BPETokenizer(gguf: meta)
            Issue.record("expected an unknown pre-tokenizer to throw")
        } catch let e as GraftError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("mystery-pre"))
            #expect(e.message.contains("tokenizer.ggml.pre"))
        }
        meta["tokenizer.ggml.pre"] = nil
        meta["tokenizer.ggml.model"] = .string("llama")
        do {
            _ = try BPETokenizer(gguf: meta)
            Issue.record("expected a non-gpt2 model to throw")
        } catch let e as GraftError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("llama"))
        }
        meta["tokenizer.ggml.model"] = .string("gpt2")
        meta["tokenizer.ggml.merges"] = nil
        do {
            _ = try BPETokenizer(gguf: meta)
            Issue.record("expected missing merges to throw")
        } catch let e as GraftError {
            #expect(e.code == .notFound)
            #expect(e.message.contains("tokenizer.ggml.merges"))
        }
        meta["tokenizer.ggml.merges"] = .array([])
        meta["tokenizer.ggml.bos_token_id"] = .string("one")
        do {
            _ = try BPETokenizer(gguf: meta)
            Issue.record("expected a string bos id to throw")
        } catch let e as GraftError {
            #expect(e.code == .format)
            #expect(e.message.contains("bos_token_id"))
        }
    }
}
