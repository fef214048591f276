/// Character-class predicates shared by the tokenizers, on unicode scalars, matching the definitions
/// Hugging Face `tokenizers` uses (Rust `char` methods and the `unicode_categories` crate).
///
/// The `unicode_categories` crate behind BERT's "control", "punctuation" and "nonspacing mark" tests has
/// Unicode 8.0 tables (checked against `tokenizers` 0.23: U+08E3, new in 8.0, is stripped as a mark; U+08E2
/// (Cf), U+2E43 (Po) and U+1DF6 (Mn), new in 9.0/10.0, are not treated as such; unassigned scalars are not
/// "control"). Those predicates therefore only accept scalars assigned by Unicode 8.0.
enum UnicodeClass {
    /// Whether `s` was assigned in Unicode 8.0 or earlier.
    @inline(__always)
    static func inUnicode8(_ s: Unicode.Scalar) -> Bool {
        guard let age = s.properties.age else { return false }
        return age.major < 8 || (age.major == 8 && age.minor == 0)
    }

    /// BERT's accent test: general category Mn, as of Unicode 8.0.
    ///
    /// Scalars whose category changed after 8.0 (found by comparing every scalar with `tokenizers`):
    /// U+1734 and U+1171E were Mn (now Mc); U+1885, U+1886, U+A9BD and U+111C9 were not Mn (now Mn).
    @inline(__always)
    static func isBertNonspacingMark(_ s: Unicode.Scalar) -> Bool {
        switch s.value {
        case 0x1734, 0x1171E: return true
        case 0x1885, 0x1886, 0xA9BD, 0x111C9: return false
        default: return s.properties.generalCategory == .nonspacingMark && inUnicode8(s)
        }
    }

    /// Rust `char::is_whitespace`: the Unicode White_Space property.
    @inline(__always)
    static func isWhitespace(_ s: Unicode.Scalar) -> Bool {
        if s.value < 0x80 {
            return s.value == 0x20 || (s.value >= 0x09 && s.value <= 0x0D)
        }
        return s.properties.isWhitespace
    }

    /// `\p{L}`: general category Lu, Ll, Lt, Lm or Lo.
    @inline(__always)
    static func isLetter(_ s: Unicode.Scalar) -> Bool {
        if s.value < 0x80 {
            let v = s.value | 0x20
            return v >= 0x61 && v <= 0x7A
        }
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }

    /// `\p{N}` and Rust `char::is_numeric`: general category Nd, Nl or No.
    @inline(__always)
    static func isNumber(_ s: Unicode.Scalar) -> Bool {
        if s.value < 0x80 { return s.value >= 0x30 && s.value <= 0x39 }
        switch s.properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }

    /// Unicode punctuation (P*: Pc, Pd, Ps, Pe, Pi, Pf, Po), as of Unicode 8.0 (U+166D and U+111C9 were Po
    /// then; they are So and Mn now).
    @inline(__always)
    static func isUnicodePunctuation(_ s: Unicode.Scalar) -> Bool {
        if s.value == 0x166D || s.value == 0x111C9 { return true }
        switch s.properties.generalCategory {
        case .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation,
             .initialPunctuation, .finalPunctuation, .otherPunctuation:
            return inUnicode8(s)
        default:
            return false
        }
    }

    /// BERT punctuation: ASCII 33–47, 58–64, 91–96, 123–126, or any Unicode P* character.
    @inline(__always)
    static func isBertPunctuation(_ s: Unicode.Scalar) -> Bool {
        let v = s.value
        if v < 0x80 {
            return (v >= 33 && v <= 47) || (v >= 58 && v <= 64) || (v >= 91 && v <= 96) || (v >= 123 && v <= 126)
        }
        return isUnicodePunctuation(s)
    }

    /// BERT "control" (`unicode_categories`' `is_other`): Cc, Cf, Co or Cs as of Unicode 8.0 — not Cn —
    /// except tab, newline and carriage return (which count as whitespace).
    @inline(__always)
    static func isBertControl(_ s: Unicode.Scalar) -> Bool {
        let v = s.value
        if v == 0x09 || v == 0x0A || v == 0x0D { return false }
        if v < 0x80 { return v < 0x20 || v == 0x7F }
        switch s.properties.generalCategory {
        case .control, .privateUse, .surrogate: return true
        case .format: return inUnicode8(s)
        default: return false
        }
    }

    /// BERT's CJK ideograph ranges (these get spaces around them).
    @inline(__always)
    static func isCJK(_ s: Unicode.Scalar) -> Bool {
        let v = s.value
        return (v >= 0x4E00 && v <= 0x9FFF) || (v >= 0x3400 && v <= 0x4DBF) || (v >= 0x20000 && v <= 0x2A6DF)
            || (v >= 0x2A700 && v <= 0x2B73F) || (v >= 0x2B740 && v <= 0x2B81F) || (v >= 0x2B920 && v <= 0x2CEAF)
            || (v >= 0xF900 && v <= 0xFAFF) || (v >= 0x2F800 && v <= 0x2FA1F)
    }
}
