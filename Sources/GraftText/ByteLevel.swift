/// GPT-2's reversible byte ↔ unicode mapping: every byte gets a printable character so byte-level BPE
/// vocabularies can be stored as text (space is `Ġ`, newline `Ċ`, tab `ĉ`).
enum ByteLevel {
    /// The character standing for each byte value.
    static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: " ", count: 256)
        var extra: UInt32 = 0
        for b in 0..<256 {
            let printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)
            let value = printable ? UInt32(b) : 256 + extra
            if !printable { extra += 1 }
            table[b] = Unicode.Scalar(value) ?? " "
        }
        return table
    }()

    /// The byte each mapped character stands for (characters 0…323; anything else is not a byte character).
    static let scalarToByte: [Int16] = {
        var table = [Int16](repeating: -1, count: 324)
        for (b, s) in byteToScalar.enumerated() { table[Int(s.value)] = Int16(b) }
        return table
    }()

    /// The byte-level spelling of `bytes` (what GGUF/tokenizer.json vocabularies store).
    static func encode<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        var view = String.UnicodeScalarView()
        for b in bytes { view.append(byteToScalar[Int(b)]) }
        return String(view)
    }

    /// The raw bytes a byte-level token spells. A character outside the mapping (which a well-formed
    /// vocabulary never has) contributes its own UTF-8 bytes.
    static func decode(_ token: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(token.utf8.count)
        for s in token.unicodeScalars {
            let v = Int(s.value)
            if v < scalarToByte.count, scalarToByte[v] >= 0 {
                out.append(UInt8(scalarToByte[v]))
            } else {
                out.append(contentsOf: String(s).utf8)
            }
        }
        return out
    }
}
