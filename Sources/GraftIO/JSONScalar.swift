import Foundation

/// A JSON scalar as `JSONSerialization` decodes it, with booleans told apart from numbers.
///
/// On Linux, `JSONSerialization` returns every JSON number as an `NSNumber`, and the NSNumbers of `0` and `1`
/// also answer `is Bool` and `as? Bool`, while `true` answers `as? Int`. Casting therefore confuses
/// `{"momentum": 0}` with `{"momentum": false}`. A JSON `true`/`false` is the only value whose `objCType` is
/// `"c"` (a `__NSCFBoolean`); every reader of decoded JSON that needs a number or a boolean classifies values
/// here instead of casting.
public enum JSONScalar: Equatable, Sendable {
    /// `true` or `false`.
    case bool(Bool)
    /// Any JSON number (an integer or a fraction).
    case number(Double)
    /// A string.
    case string(String)
    /// `null`.
    case null

    /// Classifies a decoded JSON value (or a Swift `Bool`, integer, floating-point value or `String` put into
    /// an `[String: Any]` by hand); nil for arrays, objects and anything else.
    public init?(_ value: Any) {
        // An optional boxed in Any (`dict[key] as Any`) is classified by what it holds.
        let mirror = Mirror(reflecting: value)
        if mirror.displayStyle == .optional {
            guard let wrapped = mirror.children.first?.value else { return nil }
            self.init(wrapped)
            return
        }
        switch value {
        case let s as String:
            self = .string(s)
        case is NSNull:
            self = .null
        default:
            if type(of: value) == Bool.self, let b = value as? Bool {
                self = .bool(b)
            } else if let n = value as? NSNumber {
                // A JSON boolean is an NSNumber object of objCType "c"; a Swift number bridged to NSNumber is
                // never one (its dynamic type is Int, Double, ..., not an NSNumber subclass).
                let isObject = type(of: value) is NSNumber.Type
                if isObject && String(cString: n.objCType) == "c" {
                    self = .bool(n.boolValue)
                } else {
                    self = .number(n.doubleValue)
                }
            } else {
                return nil
            }
        }
    }

    /// `value` when it is `true` or `false`; nil for numbers (also 0 and 1) and everything else.
    public static func bool(_ value: Any?) -> Bool? {
        guard let value, case .bool(let b)? = JSONScalar(value) else { return nil }
        return b
    }

    /// `value` when it is a number; nil for `true`/`false` and everything else.
    public static func number(_ value: Any?) -> Double? {
        guard let value, case .number(let d)? = JSONScalar(value) else { return nil }
        return d
    }

    /// `value` when it is a number with an integral value that fits `Int` (`3`, `3.0`); nil for `true`/`false`,
    /// fractions and everything else.
    public static func integer(_ value: Any?) -> Int? {
        guard let value, let d = number(value) else { return nil }
        if let i = value as? Int { return i }  // exact for integers beyond 2^53
        return Int(exactly: d)
    }

    /// Whether `value` is a JSON `true` or `false` (not the numbers 0 and 1).
    public static func isBool(_ value: Any?) -> Bool { bool(value) != nil }

    /// `value` as JSON spells it, for error messages: `true` (not `1`), `0.5`, `3`, `"text"`, `null`; arrays and
    /// objects as Swift prints them.
    public static func describe(_ value: Any?) -> String {
        guard let value else { return "nothing" }
        switch JSONScalar(value) {
        case .bool(let b)?: return b ? "true" : "false"
        case .number(let d)?:
            if let i = value as? Int { return String(i) }
            return d.rounded() == d && abs(d) < 1e15 ? String(Int(d)) : String(d)
        case .string(let s)?: return "\"\(s)\""
        case .null?: return "null"
        case nil: return "\(value)"
        }
    }
}
