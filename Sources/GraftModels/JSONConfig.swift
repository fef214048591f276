import Foundation
import GraftIO
import GraftTensor

/// Typed access to a JSON object with errors that name the file and the field.
public struct JSONConfig {
    /// The decoded object.
    public let object: [String: Any]
    /// Where it came from, for error messages.
    public let source: String

    /// Parses `path` as a JSON object.
    public init(contentsOf path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw GraftError(.io, "\(path): cannot read file")
        }
        try self.init(data: data, source: path)
    }

    /// Parses `data` as a JSON object.
    public init(data: Data, source: String) throws {
        let value: Any
        do {
            value = try JSONSerialization.jsonObject(with: data)
        } catch {
            throw GraftError.format("\(source): invalid JSON (\(error.localizedDescription))")
        }
        guard let object = value as? [String: Any] else {
            throw GraftError.format("\(source): expected a JSON object at the top level")
        }
        self.init(object: object, source: source)
    }

    /// Wraps an already-decoded object.
    public init(object: [String: Any], source: String) {
        self.object = object
        self.source = source
    }

    /// A required integer field (`3` or `3.0`; `true`/`false` are rejected).
    public func int(_ key: String) throws -> Int {
        guard let v = object[key] else { throw GraftError.format("\(source): missing field '\(key)'") }
        if let n = JSONScalar.integer(v) { return n }
        throw GraftError.format("\(source): field '\(key)' must be an integer, got \(JSONScalar.describe(v))")
    }

    /// An optional integer field.
    public func int(_ key: String, default value: Int) throws -> Int {
        object[key] == nil || object[key] is NSNull ? value : try int(key)
    }

    /// A required number field (`true`/`false` are rejected).
    public func double(_ key: String) throws -> Double {
        guard let v = object[key] else { throw GraftError.format("\(source): missing field '\(key)'") }
        if let d = JSONScalar.number(v) { return d }
        throw GraftError.format("\(source): field '\(key)' must be a number, got \(JSONScalar.describe(v))")
    }

    /// An optional number field.
    public func double(_ key: String, default value: Double) throws -> Double {
        object[key] == nil || object[key] is NSNull ? value : try double(key)
    }

    /// An optional array of integers; nil when absent or null.
    public func ints(_ key: String) throws -> [Int]? {
        guard let v = object[key], !(v is NSNull) else { return nil }
        guard let array = v as? [Any] else {
            throw GraftError.format("\(source): field '\(key)' must be an array of integers, got \(JSONScalar.describe(v))")
        }
        return try array.enumerated().map { i, item in
            guard let n = JSONScalar.integer(item) else {
                throw GraftError.format("\(source): field '\(key)' entry \(i) must be an integer, got \(JSONScalar.describe(item))")
            }
            return n
        }
    }

    /// An optional string field.
    public func string(_ key: String) throws -> String? {
        guard let v = object[key], !(v is NSNull) else { return nil }
        guard let s = v as? String else { throw GraftError.format("\(source): field '\(key)' must be a string, got \(v)") }
        return s
    }
}
