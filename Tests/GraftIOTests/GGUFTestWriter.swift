@testable import GraftIO

/// A minimal GGUF writer for building synthetic (and deliberately broken) files in tests.
/// Written from the GGUF spec independently of the reader under test.
struct GGUFTestWriter {
    var magic: [UInt8] = Array("GGUF".utf8)
    var version: UInt32 = 3
    var alignment: Int = 32
    /// Encoded key/value entries, in order.
    var kvs: [[UInt8]] = []
    /// Tensors: name, dimensions innermost first, ggml type id, data.
    var tensors: [(name: String, dims: [UInt64], type: UInt32, data: [UInt8])] = []
    /// Overrides the stored relative offset of a tensor (by index) to build broken files.
    var offsetOverride: [Int: UInt64] = [:]

    static func string(_ s: String) -> [UInt8] {
        var b = ByteBuilder()
        b.le(UInt64(s.utf8.count))
        b.raw(Array(s.utf8))
        return b.bytes
    }

    /// The type id and payload of a value (arrays carry their element type from the first element).
    static func encode(_ v: GGUFValue) -> (UInt32, [UInt8]) {
        var b = ByteBuilder()
        switch v {
        case .uint8(let x): b.le(x); return (0, b.bytes)
        case .int8(let x): b.le(x); return (1, b.bytes)
        case .uint16(let x): b.le(x); return (2, b.bytes)
        case .int16(let x): b.le(x); return (3, b.bytes)
        case .uint32(let x): b.le(x); return (4, b.bytes)
        case .int32(let x): b.le(x); return (5, b.bytes)
        case .float32(let x): b.f32(x); return (6, b.bytes)
        case .bool(let x): b.u8(x ? 1 : 0); return (7, b.bytes)
        case .string(let s): return (8, string(s))
        case .uint64(let x): b.le(x); return (10, b.bytes)
        case .int64(let x): b.le(x); return (11, b.bytes)
        case .float64(let x): b.f64(x); return (12, b.bytes)
        case .array(let items):
            let elementType = items.first.map { encode($0).0 } ?? 0
            b.le(elementType)
            b.le(UInt64(items.count))
            for item in items { b.raw(encode(item).1) }
            return (9, b.bytes)
        }
    }

    mutating func add(_ key: String, _ value: GGUFValue) {
        let (type, payload) = Self.encode(value)
        var b = ByteBuilder()
        b.raw(Self.string(key))
        b.le(type)
        b.raw(payload)
        kvs.append(b.bytes)
    }

    /// Adds a raw, already-encoded entry (for broken files).
    mutating func addRaw(_ bytes: [UInt8]) { kvs.append(bytes) }

    /// Adds a tensor; `shape` is outermost first, as the reader exposes it.
    mutating func addTensor(_ name: String, shape: [Int], type: GGMLType, data: [UInt8]) {
        tensors.append((name, shape.reversed().map(UInt64.init), type.rawValue, data))
    }

    func bytes() -> [UInt8] {
        var b = ByteBuilder()
        b.raw(magic)
        b.le(version)
        b.le(UInt64(tensors.count))
        b.le(UInt64(kvs.count))
        for kv in kvs { b.raw(kv) }
        var offsets: [UInt64] = []
        var running = 0
        for t in tensors {
            offsets.append(UInt64(running))
            running += t.data.count
            running = (running + alignment - 1) / alignment * alignment
        }
        for (i, t) in tensors.enumerated() {
            b.raw(Self.string(t.name))
            b.le(UInt32(t.dims.count))
            for d in t.dims { b.le(d) }
            b.le(t.type)
            b.le(offsetOverride[i] ?? offsets[i])
        }
        while b.bytes.count % alignment != 0 { b.u8(0) }
        for t in tensors {
            b.raw(t.data)
            while b.bytes.count % alignment != 0 { b.u8(0) }
        }
        return b.bytes
    }
}
