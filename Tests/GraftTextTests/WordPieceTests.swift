import Foundation
import Testing
import GraftTensor
@testable import GraftText

@Suite struct WordPieceFixtureTests {
    @Test func vocabTxtMatchesHuggingFace() throws {
        guard let path = TextTestSupport.asset("all-MiniLM-L6-v2/vocab.txt") else { return }
        let tokenizer = try WordPieceTokenizer(vocabFile: path)
        let cases = try TextTestSupport.cases("minilm_wordpiece")
        #expect(cases.count == 314)
        let matched = TextTestSupport.compare(cases, label: "minilm_wordpiece (vocab.txt)") {
            tokenizer.encode($0, addSpecialTokens: true)
        }
        #expect(matched == cases.count)
    }

    @Test func tokenizerJSONMatchesHuggingFace() throws {
        guard let path = TextTestSupport.asset("all-MiniLM-L6-v2/tokenizer.json") else { return }
        let tokenizer = try WordPieceTokenizer(tokenizerJSON: path)
        #expect(tokenizer.vocabularySize == 30522)
        let cases = try TextTestSupport.cases("minilm_wordpiece")
        let matched = TextTestSupport.compare(cases, label: "minilm_wordpiece (tokenizer.json)") {
            tokenizer.encode($0, addSpecialTokens: true)
        }
        #expect(matched == cases.count)
    }
}

@Suite struct WordPieceUnitTests {
    /// A tiny vocabulary exercising every rule.
    static func small() throws -> WordPieceTokenizer {
        try WordPieceTokenizer(vocabulary: [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
            "hello", "world", ",", "!", "un", "##aff", "##able", "cafe", "北", "京", ".", "'", "t", "don",
        ])
    }

    @Test func specialTokensAndTemplate() throws {
        let t = try Self.small()
        #expect(t.clsTokenId == 2)
        #expect(t.sepTokenId == 3)
        #expect(t.padTokenId == 0)
        #expect(t.unkTokenId == 1)
        #expect(t.encode("hello", addSpecialTokens: true) == [2, 5, 3])
        #expect(t.encode("hello", addSpecialTokens: false) == [5])
        #expect(t.encode("", addSpecialTokens: true) == [2, 3])
        // Special tokens in the text are matched whole, not lowercased and split.
        #expect(t.encode("[MASK] hello[SEP]", addSpecialTokens: false) == [4, 5, 3])
    }

    @Test func normalizationAndSplitting() throws {
        let t = try Self.small()
        #expect(t.encode("HÉLLO,   Wörld!", addSpecialTokens: false) == [5, 7, 6, 8])
        #expect(t.encode("unaffable", addSpecialTokens: false) == [9, 10, 11])
        #expect(t.encode("unknownword", addSpecialTokens: false) == [1])
        #expect(t.encode("Café\u{0}\u{FFFD}\u{200B}", addSpecialTokens: false) == [12])
        #expect(t.encode("北京", addSpecialTokens: false) == [13, 14])
        #expect(t.encode(String(repeating: "a", count: 101), addSpecialTokens: false) == [1])
        #expect(t.preTokenize("Don't\tstop.") == ["don", "'", "t", "stop", "."])
    }

    @Test func decodeRoundTrip() throws {
        let t = try Self.small()
        let ids = t.encode("Hello, unaffable world!", addSpecialTokens: true)
        #expect(t.decode(ids, skipSpecialTokens: true) == "hello, unaffable world!")
        #expect(t.decode(ids, skipSpecialTokens: false) == "[CLS] hello, unaffable world! [SEP]")
        #expect(t.decode([5, -1, 999, 6], skipSpecialTokens: false) == "hello world")
        let raw = try WordPieceTokenizer(vocabulary: ["[UNK]", "a", "##b", ","], cleanUpTokenizationSpaces: false)
        #expect(raw.decode([1, 2, 3, 1], skipSpecialTokens: false) == "ab , a")
    }

    @Test func realVocabularyRoundTrip() throws {
        guard let path = TextTestSupport.asset("all-MiniLM-L6-v2/vocab.txt") else { return }
        let t = try WordPieceTokenizer(vocabFile: path)
        #expect(t.vocabularySize == 30522)
        #expect(t.id(of: "[CLS]") == 101)
        #expect(t.token(of: 102) == "[SEP]")
        #expect(t.token(of: 30522) == nil)
        let text = "the quick brown fox jumps over the lazy dog, doesn't it?"
        let ids = t.encode(text, addSpecialTokens: true)
        #expect(t.decode(ids, skipSpecialTokens: true) == text)
    }

    /// Hugging Face's BertNormalizer/BertPreTokenizer use Unicode 8.0 category tables; these scalars are
    /// where that differs from today's Unicode (expected values from tokenizers 0.23).
    @Test func unicodeEightCategoryEdges() throws {
        guard let path = TextTestSupport.asset("all-MiniLM-L6-v2/vocab.txt") else { return }
        let t = try WordPieceTokenizer(vocabFile: path)
        let expectations: [(UInt32, [String])] = [
            (0x0381, ["[UNK]"]),           // unassigned: kept (not "control")
            (0xE000, ["ab"]),              // private use: dropped
            (0x08E2, ["[UNK]"]),           // Cf since 9.0: kept
            (0x2E3C, ["a", "[UNK]", "b"]), // Po in 7.0: punctuation
            (0x2E43, ["[UNK]"]),           // Po since 9.0: not punctuation
            (0x08E3, ["ab"]),              // Mn in 8.0: stripped
            (0x1DF6, ["[UNK]"]),           // Mn since 10.0: kept
            (0x166D, ["a", "[UNK]", "b"]), // Po in 8.0, So now
            (0x111C9, ["a", "[UNK]", "b"]), // Po in 8.0, Mn now
            (0x1885, ["[UNK]"]),           // Lo in 8.0, Mn now
            (0xA9BD, ["[UNK]"]),           // Mc in 8.0, Mn now
            (0x1734, ["ab"]),              // Mn in 8.0, Mc now
            (0x1171E, ["ab"]),             // Mn in 8.0, Mc now
        ]
        for (value, expected) in expectations {
            guard let scalar = Unicode.Scalar(value) else { continue }
            var view = String.UnicodeScalarView()
            view.append("a"); view.append(scalar); view.append("b")
            let got = t.encode(String(view), addSpecialTokens: false).map { t.token(of: $0) ?? "?" }
            #expect(got == expected, "U+\(String(value, radix: 16, uppercase: true))")
        }
    }

    @Test func loadErrors() throws {
        #expect(throws: GraftError.self) { try WordPieceTokenizer(vocabulary: []) }
        do {
            _ = try WordPieceTokenizer(vocabulary: ["a", "b"])
            Issue.record("expected missing [UNK] to throw")
        } catch let e as GraftError {
            #expect(e.code == .format)
            #expect(e.message.contains("[UNK]"))
        }
        do {
            _ = try WordPieceTokenizer(vocabFile: "/nonexistent/vocab.txt")
            Issue.record("expected a missing file to throw")
        } catch let e as GraftError {
            #expect(e.code == .notFound)
            #expect(e.message.contains("/nonexistent/vocab.txt"))
        }
    }
}
