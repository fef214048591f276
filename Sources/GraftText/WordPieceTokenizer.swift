import Foundation
import GraftTensor

/// BERT's WordPiece tokenizer, reproducing Hugging Face `BertTokenizer` / `tokenizers`
/// (`BertNormalizer` + `BertPreTokenizer` + `WordPiece` + the `[CLS] … [SEP]` template) exactly.
///
/// Pipeline for `encode`:
/// 1. Special tokens (`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, or the `added_tokens` of a
///    `tokenizer.json`) are matched whole in the raw text.
/// 2. Every other run is normalized: control characters (Cc/Cf/Co/Cs), U+0000 and U+FFFD are dropped,
///    whitespace becomes a space, CJK ideographs get spaces around them, then (uncased models) accents are stripped (NFD, drop
///    nonspacing marks) and the text is lowercased character by character.
/// 3. The text is split on whitespace, and every punctuation character (Unicode P* plus the ASCII symbol
///    ranges 33–47, 58–64, 91–96, 123–126) becomes its own word.
/// 4. Each word is split greedily, longest match first, into vocabulary pieces with `##` marking
///    continuations; a word with no split, or longer than `maxInputCharsPerWord` characters, becomes `[UNK]`.
public final class WordPieceTokenizer: Tokenizer {
    /// Vocabulary entries by id.
    public let vocabulary: [String]
    private let tokenToId: [String: Int32]
    private let specialMatcher: SpecialTokenMatcher
    private let specialIds: Set<Int32>
    private let trie: WordPieceTrie

    /// Whether the text is lowercased (and, as in BERT, accents stripped unless `stripAccents` says otherwise).
    public let lowercase: Bool
    /// Whether accents are stripped (NFD, then nonspacing marks dropped).
    public let stripAccents: Bool
    /// Words longer than this many unicode scalars become the unknown token.
    public let maxInputCharsPerWord: Int
    /// The prefix marking a piece that continues a word.
    public let continuingSubwordPrefix: String
    /// Whether `decode` tidies spaces before punctuation and contractions, like transformers'
    /// `clean_up_tokenization_spaces=True` (the BERT default).
    public let cleanUpTokenizationSpaces: Bool

    /// The `[UNK]` id.
    public let unkTokenId: Int32?
    /// The `[CLS]` id, if the vocabulary has one.
    public let clsTokenId: Int32?
    /// The `[SEP]` id, if the vocabulary has one.
    public let sepTokenId: Int32?
    /// The `[PAD]` id, if the vocabulary has one.
    public let padTokenId: Int32?
    /// The `[MASK]` id, if the vocabulary has one.
    public let maskTokenId: Int32?
    private let unkId: Int32

    /// The number of vocabulary entries.
    public var vocabularySize: Int { vocabulary.count }

    /// Creates a tokenizer from an in-memory vocabulary (id = index).
    ///
    /// - Parameters:
    ///   - vocabulary: tokens by id; a duplicated token maps to its last id, as in Hugging Face.
    ///   - unkToken, clsToken, sepToken, padToken, maskToken: the special tokens; only `unkToken` must exist.
    ///   - additionalSpecialTokens: further tokens matched whole in the input (they must be in the vocabulary).
    ///   - lowercase: lowercase the text (uncased models).
    ///   - stripAccents: strip accents; nil means "same as `lowercase`", as in `BertNormalizer`.
    ///   - maxInputCharsPerWord: longer words become `[UNK]`.
    ///   - continuingSubwordPrefix: the continuation prefix, `##` for BERT.
    ///   - cleanUpTokenizationSpaces: see the property of the same name.
    /// - Throws: `GraftError(.format)` if the vocabulary is empty, has more than `Int32.max` entries or lacks
    ///   `unkToken`; `GraftError(.invalidArgument)` if an additional special token is not in the vocabulary.
    public init(
        vocabulary: [String],
        unkToken: String = "[UNK]", clsToken: String = "[CLS]", sepToken: String = "[SEP]",
        padToken: String = "[PAD]", maskToken: String = "[MASK]",
        additionalSpecialTokens: [String] = [],
        lowercase: Bool = true, stripAccents: Bool? = nil,
        maxInputCharsPerWord: Int = 100, continuingSubwordPrefix: String = "##",
        cleanUpTokenizationSpaces: Bool = true
    ) throws {
        guard !vocabulary.isEmpty else { throw GraftError.format("WordPiece vocabulary is empty") }
        guard vocabulary.count <= Int(Int32.max) else {
            throw GraftError.format("WordPiece vocabulary has \(vocabulary.count) entries, more than Int32 ids hold")
        }
        var map = [String: Int32](minimumCapacity: vocabulary.count)
        for (i, token) in vocabulary.enumerated() { map[token] = Int32(i) }
        guard let unk = map[unkToken] else {
            throw GraftError.format("WordPiece vocabulary has no unknown token \"\(unkToken)\"")
        }
        self.vocabulary = vocabulary
        self.tokenToId = map
        self.unkId = unk
        self.unkTokenId = unk
        self.clsTokenId = map[clsToken]
        self.sepTokenId = map[sepToken]
        self.padTokenId = map[padToken]
        self.maskTokenId = map[maskToken]
        var specials: [(String, Int32)] = []
        for name in [padToken, unkToken, clsToken, sepToken, maskToken] {
            if let id = map[name] { specials.append((name, id)) }
        }
        for name in additionalSpecialTokens {
            guard let id = map[name] else {
                throw GraftError.invalid("WordPiece special token \"\(name)\" is not in the vocabulary")
            }
            specials.append((name, id))
        }
        self.specialMatcher = SpecialTokenMatcher(tokens: specials)
        self.specialIds = Set(specials.map(\.1))
        self.trie = WordPieceTrie(map, continuingSubwordPrefix: continuingSubwordPrefix)
        self.lowercase = lowercase
        self.stripAccents = stripAccents ?? lowercase
        self.maxInputCharsPerWord = maxInputCharsPerWord
        self.continuingSubwordPrefix = continuingSubwordPrefix
        self.cleanUpTokenizationSpaces = cleanUpTokenizationSpaces
    }

    /// Loads a BERT `vocab.txt` (one token per line, id = line number, counted from 0) for an uncased model.
    ///
    /// - Throws: `GraftError(.notFound)` if the file does not exist, `.io` if it cannot be read, `.format`
    ///   if it is not UTF-8, is empty or has no `[UNK]` line.
    public convenience init(vocabFile path: String, lowercase: Bool = true) throws {
        let data = try Self.readFile(path, what: "WordPiece vocab file")
        guard let text = String(data: data, encoding: .utf8) else {
            throw GraftError.format("WordPiece vocab file \(path) is not valid UTF-8")
        }
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            line.hasSuffix("\r") ? String(line.dropLast()) : String(line)
        }
        if text.hasSuffix("\n") { lines.removeLast() }
        do {
            try self.init(vocabulary: lines, lowercase: lowercase)
        } catch let error as GraftError {
            throw GraftError(error.code, "\(path): \(error.message)")
        }
    }

    /// Loads a Hugging Face `tokenizer.json` whose model is `WordPiece` (e.g. all-MiniLM-L6-v2's).
    ///
    /// Reads `model.vocab`, `model.unk_token`, `model.continuing_subword_prefix`,
    /// `model.max_input_chars_per_word`, the `BertNormalizer` flags `lowercase` and `strip_accents`, and every
    /// special entry of `added_tokens` (matched whole in the input).
    /// - Parameter path: the path of the `tokenizer.json` file.
    /// - Throws: `GraftError(.notFound/.io)` for a missing or unreadable file, `.format` naming the field for
    ///   malformed JSON, a model type other than WordPiece, or ids that are not dense `0..<n`.
    public convenience init(tokenizerJSON path: String) throws {
        let data = try Self.readFile(path, what: "tokenizer.json")
        let root: [String: Any]
        do {
            guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw GraftError.format("\(path): top level is not a JSON object")
            }
            root = object
        } catch let error as GraftError {
            throw error
        } catch {
            throw GraftError.format("\(path): invalid JSON: \(error)")
        }
        guard let model = root["model"] as? [String: Any] else {
            throw GraftError.format("\(path): missing object field \"model\"")
        }
        let type = model["type"] as? String
        guard type == "WordPiece" else {
            throw GraftError.format("\(path): model.type is \(type.map { "\"\($0)\"" } ?? "missing"), expected \"WordPiece\"")
        }
        guard let vocab = model["vocab"] as? [String: Any] else {
            throw GraftError.format("\(path): missing object field \"model.vocab\"")
        }
        var tokens = [String?](repeating: nil, count: vocab.count)
        for (token, value) in vocab {
            guard let number = value as? NSNumber, let id = Int(exactly: number.doubleValue),
                  id >= 0, id < vocab.count else {
                throw GraftError.format("\(path): model.vocab[\"\(token)\"] = \(value) is not an id in 0..<\(vocab.count)")
            }
            guard tokens[id] == nil else {
                throw GraftError.format("\(path): model.vocab id \(id) is used twice")
            }
            tokens[id] = token
        }
        let vocabulary = tokens.compactMap { $0 }
        let unk = model["unk_token"] as? String ?? "[UNK]"
        let prefix = model["continuing_subword_prefix"] as? String ?? "##"
        let maxChars = (model["max_input_chars_per_word"] as? NSNumber)?.intValue ?? 100
        var lowercase = true
        var stripAccents: Bool?
        if let normalizer = root["normalizer"] as? [String: Any], normalizer["type"] as? String == "BertNormalizer" {
            lowercase = normalizer["lowercase"] as? Bool ?? true
            stripAccents = normalizer["strip_accents"] as? Bool
        }
        var additional: [String] = []
        if let added = root["added_tokens"] as? [[String: Any]] {
            for entry in added where entry["special"] as? Bool ?? false {
                if let content = entry["content"] as? String { additional.append(content) }
            }
        }
        do {
            try self.init(vocabulary: vocabulary, unkToken: unk, additionalSpecialTokens: additional,
                          lowercase: lowercase, stripAccents: stripAccents,
                          maxInputCharsPerWord: maxChars, continuingSubwordPrefix: prefix)
        } catch let error as GraftError {
            throw GraftError(error.code, "\(path): \(error.message)")
        }
    }

    static func readFile(_ path: String, what: String) throws -> Data {
        guard FileManager.default.fileExists(atPath: path) else {
            throw GraftError(.notFound, "\(what) \(path) does not exist")
        }
        do {
            return try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw GraftError.io("cannot read \(what) \(path): \(error.localizedDescription)")
        }
    }

    /// The id of `token` in the vocabulary.
    public func id(of token: String) -> Int32? { tokenToId[token] }

    /// The vocabulary entry for `id`, or nil if out of range.
    public func token(of id: Int32) -> String? {
        id >= 0 && Int(id) < vocabulary.count ? vocabulary[Int(id)] : nil
    }

    /// Encodes `text`; with `addSpecialTokens`, the ids are wrapped in `[CLS]` … `[SEP]` (when the vocabulary
    /// has them).
    public func encode(_ text: String, addSpecialTokens: Bool) -> [Int32] {
        var ids: [Int32] = []
        ids.reserveCapacity(text.utf8.count / 3 + 2)
        if addSpecialTokens, let cls = clsTokenId { ids.append(cls) }
        let bytes = Array(text.utf8)
        for segment in specialMatcher.split(bytes) {
            switch segment {
            case .special(let id):
                ids.append(id)
            case .text(let range):
                let piece = String(decoding: bytes[range], as: UTF8.self)
                encodeOrdinary(piece, into: &ids)
            }
        }
        if addSpecialTokens, let sep = sepTokenId { ids.append(sep) }
        return ids
    }

    /// Splits `text` into the words WordPiece sees (normalization + BERT pre-tokenization), for inspection.
    public func preTokenize(_ text: String) -> [String] {
        words(in: normalize(text)).map { word in
            var view = String.UnicodeScalarView()
            view.append(contentsOf: word)
            return String(view)
        }
    }

    /// BertNormalizer: clean text, pad CJK, strip accents, lowercase.
    func normalize(_ text: String) -> [Unicode.Scalar] {
        var scalars: [Unicode.Scalar] = []
        scalars.reserveCapacity(text.utf8.count)
        var ascii = true
        let space: Unicode.Scalar = " "
        for s in text.unicodeScalars {
            let v = s.value
            if v == 0 || v == 0xFFFD || UnicodeClass.isBertControl(s) { continue }
            if UnicodeClass.isWhitespace(s) { scalars.append(space); continue }
            if v >= 0x80 {
                ascii = false
                if UnicodeClass.isCJK(s) {
                    scalars.append(space); scalars.append(s); scalars.append(space)
                    continue
                }
            }
            scalars.append(s)
        }
        if stripAccents && !ascii {
            var view = String.UnicodeScalarView()
            view.append(contentsOf: scalars)
            let decomposed = String(view).decomposedStringWithCanonicalMapping
            scalars.removeAll(keepingCapacity: true)
            for s in decomposed.unicodeScalars where !UnicodeClass.isBertNonspacingMark(s) {
                scalars.append(s)
            }
        }
        if lowercase {
            var out: [Unicode.Scalar] = []
            out.reserveCapacity(scalars.count)
            for s in scalars {
                if s.value < 0x80 {
                    if s.value >= 0x41 && s.value <= 0x5A, let lower = Unicode.Scalar(s.value + 0x20) {
                        out.append(lower)
                    } else {
                        out.append(s)
                    }
                } else {
                    // Per-character full lowercase mapping, as Rust's char::to_lowercase (no final-sigma context).
                    out.append(contentsOf: s.properties.lowercaseMapping.unicodeScalars)
                }
            }
            scalars = out
        }
        return scalars
    }

    /// BertPreTokenizer: split on whitespace (dropped) and around each punctuation character (kept).
    func words(in scalars: [Unicode.Scalar]) -> [ArraySlice<Unicode.Scalar>] {
        var words: [ArraySlice<Unicode.Scalar>] = []
        var start = 0
        var i = 0
        while i < scalars.count {
            let s = scalars[i]
            if UnicodeClass.isWhitespace(s) {
                if start < i { words.append(scalars[start..<i]) }
                start = i + 1
            } else if UnicodeClass.isBertPunctuation(s) {
                if start < i { words.append(scalars[start..<i]) }
                words.append(scalars[i...i])
                start = i + 1
            }
            i += 1
        }
        if start < scalars.count { words.append(scalars[start..<scalars.count]) }
        return words
    }

    private func encodeOrdinary(_ text: String, into ids: inout [Int32]) {
        let scalars = normalize(text)
        var bytes: [UInt8] = []
        for word in words(in: scalars) {
            if word.count > maxInputCharsPerWord {
                ids.append(unkId)
                continue
            }
            bytes.removeAll(keepingCapacity: true)
            for s in word { UTF8.encode(s) { bytes.append($0) } }
            let first = ids.count
            var start = 0
            while start < bytes.count {
                // Longest vocabulary entry starting at `start` (continuations carry the prefix).
                guard let (id, end) = trie.longestMatch(bytes, from: start, continuation: start > 0) else {
                    ids.removeSubrange(first...)
                    ids.append(unkId)
                    break
                }
                ids.append(id)
                start = end
            }
        }
    }

    /// Decodes ids: tokens are joined with spaces and `##` continuation pieces are glued to the previous token;
    /// with `cleanUpTokenizationSpaces`, spaces before `.`, `?`, `!`, `,` and inside contractions are removed
    /// (transformers' `clean_up_tokenization`). Out-of-range ids are ignored.
    public func decode(_ ids: [Int32], skipSpecialTokens: Bool) -> String {
        var out = ""
        var first = true
        for id in ids {
            guard let token = token(of: id) else { continue }
            if skipSpecialTokens && specialIds.contains(id) { continue }
            if !first && token.hasPrefix(continuingSubwordPrefix) {
                out += token.dropFirst(continuingSubwordPrefix.count)
            } else {
                if !first { out += " " }
                out += token
            }
            first = false
        }
        return cleanUpTokenizationSpaces ? Self.cleanUpTokenization(out) : out
    }

    /// transformers' `PreTrainedTokenizerBase.clean_up_tokenization`.
    static func cleanUpTokenization(_ text: String) -> String {
        var s = text
        for (from, to) in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")] where s.contains(from) {
            s = s.replacingOccurrences(of: from, with: to)
        }
        return s
    }
}
