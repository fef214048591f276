import GraftTensor

/// How byte-level BPE splits text into words before merging (merges never cross a word boundary).
public enum PreTokenizer: Sendable, Equatable, CaseIterable {
    /// GPT-2's regex split:
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    case gpt2
    /// Every number character (`\p{N}`) on its own, then the GPT-2 split within the runs between them —
    /// Hugging Face's `Digits(individual_digits=true)` + `ByteLevel`, llama.cpp's `smollm`/`starcoder`.
    case gpt2IndividualDigits

    /// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` value.
    ///
    /// `"gpt-2"`, `"gpt2"` → `.gpt2`; `"smollm"`, `"starcoder"`, `"refact"`, `"codeshell"`, `"command-r"`,
    /// `"exaone"`, `"minerva"` (llama.cpp's types that isolate each digit before the GPT-2 regex) →
    /// `.gpt2IndividualDigits`.
    /// - Throws: `GraftError(.unsupported)` naming the value for anything else.
    public init(ggufPre name: String) throws {
        switch name {
        case "gpt-2", "gpt2":
            self = .gpt2
        case "smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva":
            self = .gpt2IndividualDigits
        default:
            throw GraftError(.unsupported,
                             "tokenizer.ggml.pre = \"\(name)\" is not a supported pre-tokenizer "
                             + "(supported: gpt-2, smollm, starcoder, refact, codeshell, command-r, exaone, minerva)")
        }
    }

    /// Splits `text` into words (for inspection and tests; the tokenizer uses the same code on scalars).
    public func split(_ text: String) -> [String] {
        let scalars = Array(text.unicodeScalars)
        var out: [String] = []
        split(scalars) { range in
            var view = String.UnicodeScalarView()
            view.append(contentsOf: scalars[range])
            out.append(String(view))
        }
        return out
    }

    // Scalar classes for the regex.
    private static let letter: UInt8 = 0, number: UInt8 = 1, space: UInt8 = 2, other: UInt8 = 3

    @inline(__always)
    private static func classify(_ s: Unicode.Scalar) -> UInt8 {
        if UnicodeClass.isLetter(s) { return letter }
        if UnicodeClass.isNumber(s) { return number }
        if UnicodeClass.isWhitespace(s) { return space }
        return other
    }

    /// Calls `emit` with the scalar range of each word, in order; the ranges tile `scalars`.
    func split(_ scalars: [Unicode.Scalar], _ emit: (Range<Int>) -> Void) {
        var classes = [UInt8](repeating: 0, count: scalars.count)
        for i in scalars.indices { classes[i] = Self.classify(scalars[i]) }
        switch self {
        case .gpt2:
            Self.regexSplit(scalars, classes, 0..<scalars.count, emit)
        case .gpt2IndividualDigits:
            var start = 0
            for i in scalars.indices where classes[i] == Self.number {
                if start < i { Self.regexSplit(scalars, classes, start..<i, emit) }
                emit(i..<(i + 1))
                start = i + 1
            }
            if start < scalars.count { Self.regexSplit(scalars, classes, start..<scalars.count, emit) }
        }
    }

    /// The GPT-2 regex, hand-compiled: at each position the alternatives are tried in the regex's order.
    /// Every scalar is a letter, number, whitespace or other, so the matches tile the range.
    private static func regexSplit(
        _ sc: [Unicode.Scalar], _ cls: [UInt8], _ range: Range<Int>, _ emit: (Range<Int>) -> Void
    ) {
        let hi = range.upperBound
        var i = range.lowerBound
        while i < hi {
            let s = sc[i].value
            // 's|'t|'re|'ve|'m|'ll|'d
            if s == 0x27, i + 1 < hi {
                let a = sc[i + 1].value
                if a == 0x73 || a == 0x74 || a == 0x6D || a == 0x64 {  // s t m d
                    emit(i..<(i + 2)); i += 2; continue
                }
                if i + 2 < hi {
                    let b = sc[i + 2].value
                    if (a == 0x72 && b == 0x65) || (a == 0x76 && b == 0x65) || (a == 0x6C && b == 0x6C) {  // re ve ll
                        emit(i..<(i + 3)); i += 3; continue
                    }
                }
            }
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
            var k = i
            if s == 0x20, i + 1 < hi, cls[i + 1] != space { k = i + 1 }
            let c = cls[k]
            if c != space {
                var e = k + 1
                while e < hi && cls[e] == c { e += 1 }
                emit(i..<e); i = e; continue
            }
            // `\s+(?!\S)|\s+`
            var e = i + 1
            while e < hi && cls[e] == space { e += 1 }
            if e < hi && e - i >= 2 { e -= 1 }
            emit(i..<e); i = e
        }
    }
}
