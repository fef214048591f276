import Foundation
import GraftTensor

/// Parses `text` as one JSON object, the form every door's options take; the errors name `source` and quote the
/// start of the text (a malformed document, or valid JSON that is not an object).
func parseJSONObject(_ text: String, source: String) throws -> [String: Any] {
    let value: Any
    do {
        value = try JSONSerialization.jsonObject(with: Data(text.utf8))
    } catch {
        throw GraftError.invalid("\(source) is not valid JSON (\(error.localizedDescription)): \(text.prefix(80))")
    }
    guard let object = value as? [String: Any] else {
        throw GraftError.invalid("\(source) must be a JSON object, got \(text.prefix(80))")
    }
    return object
}
