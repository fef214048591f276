import Foundation
import GraftTensor

/// Byte-level BPE (GPT-2 style), as stored in GGUF tokenizer metadata or a Hugging Face `tokenizer.json`.
///
/// `encode`:
/// 1. Control and user-defined tokens (GGUF token types 3 and 4, e.g. `<|im_start|>`) are matched whole in
///    the raw text, leftmost-longest, and emitted as their ids.
/// 2. The text between them is split into words by the `PreTokenizer`.
/// 3. Each word's UTF-8 bytes start as one symbol per byte (a byte with no token is dropped, as in Hugging
///    Face BPE without an unk token and in llama.cpp); adjacent pairs are merged by lowest merge rank
///    (ties leftmost) until no pair has a rank. Results are cached per word.
///
/// No BOS/EOS is added unless `addBosToken`/`addEosToken` is set and `addSpecialTokens` is true.
/// Instances are immutable apart from the synchronised word cache, so they may be shared across threads.
public final class BPETokenizer: Tokenizer {
    /// Vocabulary entries by id, as stored (byte-level spelling for ordinary tokens).
    public let tokens: [String]
    /// GGUF token types by id (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), if given.
    public let tokenTypes: [Int32]?
    /// The word splitter.
    public let preTokenizer: PreTokenizer
    /// The beginning-of-sequence id.
    public let bosTokenId: Int32?
    /// The end-of-sequence id.
    public let eosTokenId: Int32?
    /// The unknown-token id.
    public let unkTokenId: Int32?
    /// The padding id.
    public let padTokenId: Int32?
    /// Whether `encode(_:addSpecialTokens: true)` prepends `bosTokenId` (GGUF `tokenizer.ggml.add_bos_token`).
    public let addBosToken: Bool
    /// Whether `encode(_:addSpecialTokens: true)` appends `eosTokenId` (GGUF `tokenizer.ggml.add_eos_token`).
    public let addEosToken: Bool

    private let tokenToId: [String: Int32]
    /// Merge table: (left id << 32 | right id) → (rank << 32 | merged id).
    private let merges: [UInt64: UInt64]
    /// Initial symbol for each byte value.
    private let byteIds: [Int32]
    /// Bytes each token decodes to.
    private let tokenBytes: [[UInt8]]
    /// Ids left out by `decode(skipSpecialTokens: true)`.
    private let specialIds: Set<Int32>
    private let specialMatcher: SpecialTokenMatcher
    private let cache = WordCache(capacity: 10_000)

    /// The number of vocabulary entries.
    public var vocabularySize: Int { tokens.count }

    /// Builds a tokenizer from GGUF-style vocabulary data.
    ///
    /// - Parameters:
    ///   - tokens: vocabulary by id, byte-level spelling (`Ġthe`); control/user-defined tokens as plain text.
    ///   - merges: merge rules in priority order, each `"left right"` (one space); rank = index.
    ///   - tokenTypes: GGUF token types by id, or nil; types 3 (control) and 4 (user-defined) are matched
    ///     whole in the input. Without types, the bos/eos/unk/pad tokens are.
    ///   - bosId, eosId, unkId, padId: special ids (each must be a valid id if given).
    ///   - preTokenizer: the word splitter.
    ///   - addBosToken, addEosToken: whether `encode(addSpecialTokens: true)` adds BOS/EOS (default no).
    /// - Throws: `GraftError(.format)` naming the offending index and value for: an empty vocabulary, a
    ///   type list of the wrong length, an out-of-range special id, or a malformed merge or one whose parts or
    ///   result are not in the vocabulary. A byte with no token is allowed: it is dropped when encoding.
    public init(
        tokens: [String], merges: [String], tokenTypes: [Int32]?,
        bosId: Int32?, eosId: Int32?, unkId: Int32?, padId: Int32?,
        preTokenizer: PreTokenizer, addBosToken: Bool = false, addEosToken: Bool = false
    ) throws {
        guard !tokens.isEmpty else { throw GraftError.format("BPE vocabulary (tokens) is empty") }
        guard tokens.count < Int(Int32.max) else {
            throw GraftError.format("BPE vocabulary has \(tokens.count) tokens, more than Int32 ids hold")
        }
        if let types = tokenTypes, types.count != tokens.count {
            throw GraftError.format("BPE token_type has \(types.count) entries but tokens has \(tokens.count)")
        }
        for (name, id) in [("bos", bosId), ("eos", eosId), ("unknown", unkId), ("padding", padId)] {
            if let id, id < 0 || Int(id) >= tokens.count {
                throw GraftError.format("BPE \(name) token id \(id) is outside the vocabulary 0..<\(tokens.count)")
            }
        }
        var map = [String: Int32](minimumCapacity: tokens.count)
        for (i, t) in tokens.enumerated() where map[t] == nil { map[t] = Int32(i) }

        var mergeTable = [UInt64: UInt64](minimumCapacity: merges.count)
        for (rank, rule) in merges.enumerated() {
            let parts = rule.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty, !parts[1].contains(" ") else {
                throw GraftError.format("BPE merge \(rank) \"\(rule)\" is not two tokens separated by one space")
            }
            let left = String(parts[0]), right = String(parts[1])
            guard let l = map[left], let r = map[right] else {
                throw GraftError.format("BPE merge \(rank) \"\(rule)\": \"\(map[left] == nil ? left : right)\" is not in the vocabulary")
            }
            guard let merged = map[left + right] else {
                throw GraftError.format("BPE merge \(rank) \"\(rule)\": result \"\(left + right)\" is not in the vocabulary")
            }
            // A later duplicate overrides an earlier one, as in Hugging Face tokenizers.
            mergeTable[UInt64(UInt32(l)) << 32 | UInt64(UInt32(r))] = UInt64(rank) << 32 | UInt64(UInt32(merged))
        }

        // A byte with no token (SmolLM2 lacks e.g. 0x04 and 0xF1) is dropped from the word, as Hugging Face
        // BPE without an unk_token and llama.cpp both do; its neighbours may then merge.
        var byteIds = [Int32](repeating: -1, count: 256)
        for b in 0..<256 {
            if let id = map[String(ByteLevel.byteToScalar[b])] { byteIds[b] = id }
        }

        var specials: [(String, Int32)] = []
        var skip = Set<Int32>()
        if let types = tokenTypes {
            for (i, type) in types.enumerated() where type == 3 || type == 4 {
                specials.append((tokens[i], Int32(i)))
                if type == 3 { skip.insert(Int32(i)) }
            }
        } else {
            for id in [bosId, eosId, unkId, padId].compactMap({ $0 }) {
                specials.append((tokens[Int(id)], id))
            }
        }
        for id in [bosId, eosId, unkId, padId].compactMap({ $0 }) { skip.insert(id) }

        var bytes: [[UInt8]] = []
        bytes.reserveCapacity(tokens.count)
        for (i, t) in tokens.enumerated() {
            let type = tokenTypes?[i] ?? 1
            bytes.append(type == 3 || type == 4 ? Array(t.utf8) : ByteLevel.decode(t))
        }

        self.tokens = tokens
        self.tokenTypes = tokenTypes
        self.preTokenizer = preTokenizer
        self.bosTokenId = bosId
        self.eosTokenId = eosId
        self.unkTokenId = unkId
        self.padTokenId = padId
        self.addBosToken = addBosToken
        self.addEosToken = addEosToken
        self.tokenToId = map
        self.merges = mergeTable
        self.byteIds = byteIds
        self.tokenBytes = bytes
        self.specialIds = skip
        self.specialMatcher = SpecialTokenMatcher(tokens: specials)
    }

    /// The id of the vocabulary entry spelled exactly `token` (byte-level spelling, e.g. `Ġthe`).
    public func id(of token: String) -> Int32? { tokenToId[token] }

    /// The vocabulary entry for `id` as stored (byte-level spelling), or nil if out of range.
    public func token(of id: Int32) -> String? {
        id >= 0 && Int(id) < tokens.count ? tokens[Int(id)] : nil
    }

    /// Encodes `text`. Control/user-defined tokens in the text are always recognised; `addSpecialTokens`
    /// only controls BOS/EOS, which are added when `addBosToken`/`addEosToken` say so.
    public func encode(_ text: String, addSpecialTokens: Bool) -> [Int32] {
        var ids: [Int32] = []
        ids.reserveCapacity(text.utf8.count / 3 + 2)
        if addSpecialTokens, addBosToken, let bos = bosTokenId { ids.append(bos) }
        let bytes = Array(text.utf8)
        var scalars: [Unicode.Scalar] = []
        var offsets: [Int] = []
        for segment in specialMatcher.split(bytes) {
            switch segment {
            case .special(let id):
                ids.append(id)
            case .text(let range):
                // Scalars of the run and the byte offset where each starts (the run is valid UTF-8).
                scalars.removeAll(keepingCapacity: true)
                offsets.removeAll(keepingCapacity: true)
                var offset = range.lowerBound
                for s in String(decoding: bytes[range], as: UTF8.self).unicodeScalars {
                    scalars.append(s)
                    offsets.append(offset)
                    offset += UTF8.width(s)
                }
                offsets.append(offset)
                preTokenizer.split(scalars) { word in
                    encodeWord(bytes[offsets[word.lowerBound]..<offsets[word.upperBound]], into: &ids)
                }
            }
        }
        if addSpecialTokens, addEosToken, let eos = eosTokenId { ids.append(eos) }
        return ids
    }

    /// Splits `text` into the words BPE merges within (special tokens are not recognised here).
    public func preTokenize(_ text: String) -> [String] { preTokenizer.split(text) }

    private func encodeWord(_ word: ArraySlice<UInt8>, into ids: inout [Int32]) {
        if word.count == 1 {
            let id = byteIds[Int(word[word.startIndex])]
            if id >= 0 { ids.append(id) }
            return
        }
        let key = Array(word)
        if let hit = cache.get(key) {
            ids.append(contentsOf: hit)
            return
        }
        let result = bpe(word)
        cache.put(key, result)
        ids.append(contentsOf: result)
    }

    @inline(__always)
    private func rankedMerge(_ left: Int32, _ right: Int32) -> UInt64? {
        merges[UInt64(UInt32(bitPattern: left)) << 32 | UInt64(UInt32(bitPattern: right))]
    }

    /// Merges one word: symbols in a doubly linked list, candidate pairs in a min-heap keyed by
    /// (rank, position); a popped pair is applied only if it is still present.
    func bpe(_ word: ArraySlice<UInt8>) -> [Int32] {
        var sym: [Int32] = []
        sym.reserveCapacity(word.count)
        for b in word {
            let id = byteIds[Int(b)]
            if id >= 0 { sym.append(id) }
        }
        let n = sym.count
        if n < 2 { return sym }
        var prev = [Int](repeating: -1, count: n)
        var next = [Int](repeating: -1, count: n)
        var alive = [Bool](repeating: true, count: n)
        for i in 0..<n {
            prev[i] = i - 1
            next[i] = i + 1 < n ? i + 1 : -1
        }
        var heap = MinHeap()
        for i in 0..<(n - 1) {
            if let m = rankedMerge(sym[i], sym[i + 1]) { heap.push((m & 0xFFFF_FFFF_0000_0000) | UInt64(i)) }
        }
        while let top = heap.pop() {
            let rank = top >> 32
            let pos = Int(top & 0xFFFF_FFFF)
            guard alive[pos] else { continue }
            let right = next[pos]
            guard right >= 0, let m = rankedMerge(sym[pos], sym[right]), m >> 32 == rank else { continue }
            // Merge right into pos.
            sym[pos] = Int32(truncatingIfNeeded: m & 0xFFFF_FFFF)
            alive[right] = false
            let after = next[right]
            next[pos] = after
            if after >= 0 { prev[after] = pos }
            let before = prev[pos]
            if before >= 0, let m2 = rankedMerge(sym[before], sym[pos]) { heap.push((m2 & 0xFFFF_FFFF_0000_0000) | UInt64(before)) }
            if after >= 0, let m2 = rankedMerge(sym[pos], sym[after]) { heap.push((m2 & 0xFFFF_FFFF_0000_0000) | UInt64(pos)) }
        }
        var out: [Int32] = []
        var i = 0
        while i >= 0 {
            out.append(sym[i])
            i = next[i]
        }
        return out
    }

    /// Decodes ids to text: each token's bytes (byte-level tokens mapped back to raw bytes, control and
    /// user-defined tokens as their text) are concatenated and read as UTF-8, invalid sequences becoming
    /// U+FFFD. With `skipSpecialTokens`, control tokens and the bos/eos/unk/pad ids are left out.
    /// Out-of-range ids are ignored.
    public func decode(_ ids: [Int32], skipSpecialTokens: Bool) -> String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(ids.count * 4)
        for id in ids where id >= 0 && Int(id) < tokens.count {
            if skipSpecialTokens && specialIds.contains(id) { continue }
            bytes.append(contentsOf: tokenBytes[Int(id)])
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// A binary min-heap of packed (rank << 32 | position) keys.
struct MinHeap {
    private var items: [UInt64] = []

    mutating func push(_ x: UInt64) {
        items.append(x)
        var i = items.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            if items[p] <= items[i] { break }
            items.swapAt(p, i)
            i = p
        }
    }

    mutating func pop() -> UInt64? {
        guard let last = items.popLast() else { return nil }
        guard !items.isEmpty else { return last }
        let top = items[0]
        items[0] = last
        var i = 0
        let n = items.count
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < n && items[l] < items[m] { m = l }
            if r < n && items[r] < items[m] { m = r }
            if m == i { break }
            items.swapAt(m, i)
            i = m
        }
        return top
    }
}

/// A bounded, lock-protected word → ids cache (like Hugging Face's: once full, new words are not cached).
final class WordCache: @unchecked Sendable {
    private let lock = NSLock()
    private var map: [[UInt8]: [Int32]] = [:]
    private let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    func get(_ key: [UInt8]) -> [Int32]? {
        lock.lock(); defer { lock.unlock() }
        return map[key]
    }

    func put(_ key: [UInt8], _ value: [Int32]) {
        guard key.count < 256 else { return }
        lock.lock(); defer { lock.unlock() }
        if map.count < capacity { map[key] = value }
    }
}
