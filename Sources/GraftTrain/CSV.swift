import GraftIO
import GraftTensor

/// A minimal RFC 4180 CSV reader (quoted fields, doubled quotes, newlines inside quotes) over Latin-1 or UTF-8.
public enum CSVReader {
    /// The text encoding of a CSV file.
    public enum Encoding: Sendable {
        /// One byte per character (ISO-8859-1), as Python's `encoding="latin-1"`.
        case latin1
        /// UTF-8 (invalid sequences become U+FFFD).
        case utf8
    }

    /// All records of the file at `path`, header included.
    public static func read(path: String, encoding: Encoding) throws -> [[String]] {
        let bytes = try readFile(path)
        return parse(bytes, encoding: encoding)
    }

    /// Splits `bytes` into records of fields.
    public static func parse(_ bytes: [UInt8], encoding: Encoding) -> [[String]] {
        var records: [[String]] = []
        var record: [String] = []
        var field: [UInt8] = []
        var inQuotes = false
        var fieldStarted = false
        var i = 0
        func finishField() {
            switch encoding {
            case .latin1:
                var s = String.UnicodeScalarView()
                for b in field { s.append(Unicode.Scalar(b)) }
                record.append(String(s))
            case .utf8:
                record.append(String(decoding: field, as: UTF8.self))
            }
            field.removeAll(keepingCapacity: true)
            fieldStarted = false
        }
        while i < bytes.count {
            let c = bytes[i]
            if inQuotes {
                if c == UInt8(ascii: "\"") {
                    if i + 1 < bytes.count && bytes[i + 1] == UInt8(ascii: "\"") {
                        field.append(c)
                        i += 1
                    } else {
                        inQuotes = false
                    }
                } else {
                    field.append(c)
                }
            } else {
                switch c {
                case UInt8(ascii: "\"") where !fieldStarted || field.isEmpty:
                    inQuotes = true
                    fieldStarted = true
                case UInt8(ascii: ","):
                    finishField()
                case UInt8(ascii: "\n"), UInt8(ascii: "\r"):
                    if c == UInt8(ascii: "\r") && i + 1 < bytes.count && bytes[i + 1] == UInt8(ascii: "\n") { i += 1 }
                    finishField()
                    records.append(record)
                    record = []
                default:
                    field.append(c)
                    fieldStarted = true
                }
            }
            i += 1
        }
        if fieldStarted || !field.isEmpty || !record.isEmpty {
            finishField()
            records.append(record)
        }
        return records
    }
}
