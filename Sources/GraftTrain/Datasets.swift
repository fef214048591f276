import Foundation
import GraftIO
import GraftTensor

/// A text with a class label (sequence classification).
public struct LabeledText: Sendable, Equatable {
    /// The text.
    public var text: String
    /// The class index.
    public var label: Int
    /// Creates an example.
    public init(text: String, label: Int) {
        self.text = text
        self.label = label
    }
}

/// A causal-LM example: loss is taken on `completion` only when `prompt` is non-empty, on all of `text` otherwise.
public struct TextCompletion: Sendable, Equatable {
    /// Context the model sees but is not trained to produce.
    public var prompt: String
    /// What the model is trained to produce.
    public var completion: String
    /// Creates an example.
    public init(prompt: String, completion: String) {
        self.prompt = prompt
        self.completion = completion
    }
}

/// The tweet sentiment corpus split exactly as the project's comparisons with PEFT use it.
public enum TweetCorpus {
    /// Label names in class-index order.
    public static let labels = ["negative", "neutral", "positive"]

    /// Train and test splits: the CSV read as Latin-1, each text stripped (Python's whitespace), empty texts
    /// skipped, only the first occurrence of each exact text kept; unique row `i` goes to test when
    /// `i % 5 == 4`, else to train.
    public static func load(path: String) throws -> (train: [LabeledText], test: [LabeledText]) {
        let records = try CSVReader.read(path: path, encoding: .latin1)
        guard let header = records.first else { throw GraftError.format("\(path): empty CSV") }
        guard let si = header.firstIndex(of: "sentiment"), let ti = header.firstIndex(of: "text") else {
            throw GraftError.format("\(path): header \(header) lacks the columns 'sentiment' and 'text'")
        }
        var seen = Set<String>()
        var unique: [LabeledText] = []
        for (n, record) in records.dropFirst().enumerated() {
            if record.count == 1 && record[0].isEmpty { continue }
            guard record.count > max(si, ti) else {
                throw GraftError.format("\(path): row \(n + 2) has \(record.count) fields, expected \(header.count)")
            }
            let text = pythonStrip(record[ti])
            if text.isEmpty || seen.contains(text) { continue }
            guard let label = labels.firstIndex(of: record[si]) else {
                throw GraftError.format("\(path): row \(n + 2): sentiment '\(record[si])' is not one of \(labels)")
            }
            seen.insert(text)
            unique.append(LabeledText(text: text, label: label))
        }
        var train: [LabeledText] = [], test: [LabeledText] = []
        for (i, example) in unique.enumerated() {
            if i % 5 == 4 { test.append(example) } else { train.append(example) }
        }
        return (train, test)
    }

    /// The demo subsets: train rows with index % 10 == 0, test rows with index % 5 == 0.
    public static func demoSubsets(path: String) throws -> (train: [LabeledText], test: [LabeledText]) {
        let (train, test) = try load(path: path)
        return (train.enumerated().filter { $0.offset % 10 == 0 }.map(\.element),
                test.enumerated().filter { $0.offset % 5 == 0 }.map(\.element))
    }

    /// `str.strip()`: removes the characters Python counts as whitespace from both ends.
    static func pythonStrip(_ s: String) -> String {
        let scalars = s.unicodeScalars
        func isSpace(_ c: Unicode.Scalar) -> Bool {
            switch c.value {
            case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0, 0x1680, 0x2000...0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000: return true
            default: return false
            }
        }
        guard let first = scalars.firstIndex(where: { !isSpace($0) }),
              let last = scalars.lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(scalars[first...last])
    }
}

/// Datasets stored as JSON Lines.
public enum JSONLDataset {
    /// Classification examples `{"text": ..., "label": ...}`; a string label is looked up in `labelNames`
    /// (or added to it, in order of first appearance, when `labelNames` starts empty).
    public static func loadClassification(path: String, labelNames: inout [String]) throws -> [LabeledText] {
        let fixedLabels = !labelNames.isEmpty
        return try lines(path).map { (line, object) in
            guard let text = object["text"] as? String else {
                throw GraftError.format("\(path):\(line): missing string field 'text'")
            }
            switch object["label"] {
            case let n as Int:
                guard n >= 0 else { throw GraftError.format("\(path):\(line): label \(n) is negative") }
                return LabeledText(text: text, label: n)
            case let s as String:
                if let i = labelNames.firstIndex(of: s) { return LabeledText(text: text, label: i) }
                guard !fixedLabels else { throw GraftError.format("\(path):\(line): label '\(s)' is not one of \(labelNames)") }
                labelNames.append(s)
                return LabeledText(text: text, label: labelNames.count - 1)
            default:
                throw GraftError.format("\(path):\(line): missing integer or string field 'label'")
            }
        }
    }

    /// Causal-LM examples: `{"prompt": ..., "completion": ...}` or `{"text": ...}` (trained on all of it).
    public static func loadCompletions(path: String) throws -> [TextCompletion] {
        try lines(path).map { (line, object) in
            if let completion = object["completion"] as? String {
                return TextCompletion(prompt: object["prompt"] as? String ?? "", completion: completion)
            }
            if let text = object["text"] as? String { return TextCompletion(prompt: "", completion: text) }
            throw GraftError.format("\(path):\(line): expected 'prompt' + 'completion' or 'text'")
        }
    }

    private static func lines(_ path: String) throws -> [(Int, [String: Any])] {
        let bytes = try readFile(path)
        var out: [(Int, [String: Any])] = []
        for (i, raw) in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).enumerated() {
            let trimmed = raw.drop { $0 == 32 || $0 == 9 || $0 == 13 }
            if trimmed.isEmpty || trimmed.allSatisfy({ $0 == 32 || $0 == 9 || $0 == 13 }) { continue }
            let value: Any
            do {
                value = try JSONSerialization.jsonObject(with: Data(raw))
            } catch {
                throw GraftError.format("\(path):\(i + 1): invalid JSON")
            }
            guard let object = value as? [String: Any] else { throw GraftError.format("\(path):\(i + 1): expected a JSON object") }
            out.append((i + 1, object))
        }
        return out
    }
}
