/// One metadata value of a GGUF file.
public enum GGUFValue: Sendable, Equatable {
    /// GGUF type 0.
    case uint8(UInt8)
    /// GGUF type 1.
    case int8(Int8)
    /// GGUF type 2.
    case uint16(UInt16)
    /// GGUF type 3.
    case int16(Int16)
    /// GGUF type 4.
    case uint32(UInt32)
    /// GGUF type 5.
    case int32(Int32)
    /// GGUF type 10.
    case uint64(UInt64)
    /// GGUF type 11.
    case int64(Int64)
    /// GGUF type 6.
    case float32(Float)
    /// GGUF type 12.
    case float64(Double)
    /// GGUF type 7 (one byte, 0 or 1).
    case bool(Bool)
    /// GGUF type 8 (UTF-8; invalid sequences are replaced with U+FFFD).
    case string(String)
    /// GGUF type 9: a typed array; elements may themselves be arrays.
    case array([GGUFValue])

    /// The value of any integer case as `Int`; nil for other cases and for a `uint64` above `Int.max`.
    public var int: Int? {
        switch self {
        case .uint8(let v): return Int(v)
        case .int8(let v): return Int(v)
        case .uint16(let v): return Int(v)
        case .int16(let v): return Int(v)
        case .uint32(let v): return Int(v)
        case .int32(let v): return Int(v)
        case .uint64(let v): return Int(exactly: v)
        case .int64(let v): return Int(v)
        default: return nil
        }
    }

    /// The value of a float or integer case as `Double`; nil for other cases.
    public var double: Double? {
        switch self {
        case .float32(let v): return Double(v)
        case .float64(let v): return v
        default: return int.map(Double.init)
        }
    }

    /// The value of a `bool` case.
    public var bool: Bool? {
        if case .bool(let v) = self { return v }
        return nil
    }

    /// The value of a `string` case.
    public var string: String? {
        if case .string(let v) = self { return v }
        return nil
    }

    /// The elements of an `array` case.
    public var array: [GGUFValue]? {
        if case .array(let v) = self { return v }
        return nil
    }

    /// The elements of an array of strings; nil if this is not an array or any element is not a string.
    public var stringArray: [String]? {
        guard let a = array else { return nil }
        var out: [String] = []
        out.reserveCapacity(a.count)
        for v in a {
            guard let s = v.string else { return nil }
            out.append(s)
        }
        return out
    }

    /// The elements of an array of integers; nil if this is not an array or any element is not an integer
    /// that fits in `Int`.
    public var intArray: [Int]? {
        guard let a = array else { return nil }
        var out: [Int] = []
        out.reserveCapacity(a.count)
        for v in a {
            guard let i = v.int else { return nil }
            out.append(i)
        }
        return out
    }

    /// The elements of an array of numbers (float or integer) as `Float`; nil otherwise.
    public var floatArray: [Float]? {
        guard let a = array else { return nil }
        var out: [Float] = []
        out.reserveCapacity(a.count)
        for v in a {
            guard let d = v.double else { return nil }
            out.append(Float(d))
        }
        return out
    }
}
