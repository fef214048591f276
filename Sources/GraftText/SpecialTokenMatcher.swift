/// Finds whole special tokens (e.g. `[CLS]`, `<|im_start|>`) in raw UTF-8 text, leftmost-longest, the way
/// Hugging Face `tokenizers` matches added tokens before normalization and pre-tokenization.
struct SpecialTokenMatcher: Sendable {
    /// One piece of the input: either a run of ordinary text (a UTF-8 byte range) or a matched special token.
    enum Segment: Equatable {
        case text(Range<Int>)
        case special(Int32)
    }

    /// Candidates by first byte, longest first.
    private var byFirstByte: [[(bytes: [UInt8], id: Int32)]]
    /// Whether any special token is registered.
    let isEmpty: Bool

    init(tokens: [(String, Int32)]) {
        var table = [[(bytes: [UInt8], id: Int32)]](repeating: [], count: 256)
        for (text, id) in tokens where !text.isEmpty {
            let bytes = Array(text.utf8)
            table[Int(bytes[0])].append((bytes, id))
        }
        for i in 0..<256 where table[i].count > 1 {
            table[i].sort { $0.bytes.count > $1.bytes.count }
        }
        byFirstByte = table
        isEmpty = tokens.allSatisfy { $0.0.isEmpty }
    }

    /// Splits `bytes` into text runs and special tokens. Text runs are never empty.
    func split(_ bytes: [UInt8]) -> [Segment] {
        if isEmpty || bytes.isEmpty {
            return bytes.isEmpty ? [] : [.text(0..<bytes.count)]
        }
        var out: [Segment] = []
        var textStart = 0
        var i = 0
        let n = bytes.count
        while i < n {
            let candidates = byFirstByte[Int(bytes[i])]
            var matched: (length: Int, id: Int32)?
            for candidate in candidates where candidate.bytes.count <= n - i {
                var equal = true
                var k = 1
                while k < candidate.bytes.count {
                    if bytes[i + k] != candidate.bytes[k] { equal = false; break }
                    k += 1
                }
                if equal { matched = (candidate.bytes.count, candidate.id); break }
            }
            if let m = matched {
                if textStart < i { out.append(.text(textStart..<i)) }
                out.append(.special(m.id))
                i += m.length
                textStart = i
            } else {
                i += 1
            }
        }
        if textStart < n { out.append(.text(textStart..<n)) }
        return out
    }
}
