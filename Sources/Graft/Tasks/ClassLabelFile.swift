import Foundation
import GraftIO

/// The class names of a classification adapter, saved beside it as `labels.json` in transformers' shape:
/// `{"id2label": {"0": "negative", ...}, "label2id": {"negative": 0, ...}}`. PEFT ignores the file; Graft reads
/// it back when the adapter is loaded, so string labels keep their numbering across runs.
public enum ClassLabelFile {
    /// The file name inside an adapter directory.
    public static let fileName = "labels.json"

    /// transformers' `id2label`: class index (as a string key) to name.
    public static func id2label(_ names: [String]) -> [String: String] {
        Dictionary(uniqueKeysWithValues: names.enumerated().map { (String($0.offset), $0.element) })
    }

    /// The file's bytes for `names`.
    public static func encode(_ names: [String]) throws -> [UInt8] {
        let object: [String: Any] = [
            "id2label": id2label(names),
            "label2id": Dictionary(uniqueKeysWithValues: names.enumerated().map { ($0.element, $0.offset) }),
        ]
        return [UInt8](try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]))
    }

    /// The class names saved in `directory`, or nil when it has no `labels.json`. Throws naming the file when it
    /// is malformed: not an object, an `id2label` whose keys are not exactly `0..<n`, or names that repeat.
    public static func read(directory: String) throws -> [String]? {
        let path = directory + "/" + fileName
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let map = object["id2label"] as? [String: Any] else {
            throw GraftError.format("\(path): expected a JSON object with an 'id2label' object")
        }
        var names = [String?](repeating: nil, count: map.count)
        for (key, value) in map {
            guard let i = Int(key), i >= 0, i < map.count else {
                throw GraftError.format("\(path): id2label key '\(key)' is not a class index in 0..<\(map.count)")
            }
            guard let name = value as? String else {
                throw GraftError.format("\(path): id2label['\(key)'] must be a string, got \(JSONScalar.describe(value))")
            }
            names[i] = name
        }
        let resolved = names.compactMap { $0 }
        guard Set(resolved).count == resolved.count else {
            throw GraftError.format("\(path): class names repeat (\(resolved.joined(separator: ", ")))")
        }
        return resolved
    }
}
