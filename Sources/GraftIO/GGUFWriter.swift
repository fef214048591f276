import GraftTensor

/// Builds a GGUF version 3 file in memory: metadata in the order added, then tensor infos, then the tensors' data,
/// each tensor starting on the file's alignment (32 bytes unless `general.alignment` says otherwise), as gguf-py's
/// `GGUFWriter` lays a file out. ``GGUFFile`` and llama.cpp read what it writes.
public struct GGUFWriter {
    /// The data alignment in bytes (GGUF's default 32; written as `general.alignment` only when it differs).
    public private(set) var alignment = 32
    private var keys: [String] = []
    private var values: [GGUFValue] = []
    private var tensors: [(name: String, shape: [Int], type: GGMLType, data: [UInt8])] = []

    /// An empty file.
    public init() {}

    /// Adds a metadata entry; a key given twice, an empty array or an array mixing element types is an error.
    public mutating func add(_ key: String, _ value: GGUFValue) throws {
        guard !keys.contains(key) else { throw GraftError.invalid("GGUF metadata key '\(key)' is given twice") }
        try Self.checkArray(value, key: key)
        if key == "general.alignment" {
            guard let a = value.int, a > 0, a & (a - 1) == 0, case .uint32 = value else {
                throw GraftError.invalid("general.alignment must be a uint32 power of two, got \(value)")
            }
            alignment = a
        }
        keys.append(key)
        values.append(value)
    }

    /// Adds a tensor of `type` whose `shape` is outermost first (`[rows, columns]`, as ``GGUFFile`` reports it;
    /// the file stores it innermost first) from already-encoded bytes.
    public mutating func addTensor(_ name: String, shape: [Int], type: GGMLType, bytes: [UInt8]) throws {
        guard !tensors.contains(where: { $0.name == name }) else { throw GraftError.invalid("GGUF tensor '\(name)' is added twice") }
        guard !shape.isEmpty, shape.allSatisfy({ $0 > 0 }), let inner = shape.last, inner % type.blockSize == 0 else {
            throw GraftError.invalid("GGUF tensor '\(name)': shape \(shape) does not suit \(type.name) (rows of whole \(type.blockSize)-element blocks)")
        }
        let count = shape.reduce(1, *)
        guard bytes.count == count / type.blockSize * type.typeSize else {
            throw GraftError.invalid("GGUF tensor '\(name)': \(bytes.count) bytes for \(count) \(type.name) elements")
        }
        tensors.append((name, shape, type, bytes))
    }

    /// Adds a float32 tensor encoded as `type` (F32, F16, BF16, Q8_0 or Q4_1, as ggml's reference quantizers do).
    public mutating func addTensor(_ name: String, _ tensor: Tensor, type: GGMLType) throws {
        guard let inner = tensor.shape.last, inner % type.blockSize == 0 else {
            throw GraftError.invalid("GGUF tensor '\(name)': rows of \(tensor.shape.last ?? 0) elements are not whole \(type.name) blocks of \(type.blockSize)")
        }
        var bytes = [UInt8](repeating: 0, count: tensor.count / type.blockSize * type.typeSize)
        try bytes.withUnsafeMutableBytes { raw in
            guard let base = raw.baseAddress else { return }
            do {
                try type.quantize(tensor.pointer, into: base, count: tensor.count)
            } catch let e as GraftError {
                throw GraftError(e.code, "GGUF tensor '\(name)': \(e.message)")
            }
        }
        try addTensor(name, shape: tensor.shape, type: type, bytes: bytes)
    }

    /// The file's bytes.
    public func serialized() -> [UInt8] {
        var out: [UInt8] = Array("GGUF".utf8)
        Self.put(UInt32(3), &out)
        Self.put(UInt64(tensors.count), &out)
        Self.put(UInt64(keys.count), &out)
        for (key, value) in zip(keys, values) {
            Self.putString(key, &out)
            Self.put(Self.typeID(value), &out)
            Self.putValue(value, &out)
        }
        var offset = 0
        for t in tensors {
            Self.putString(t.name, &out)
            Self.put(UInt32(t.shape.count), &out)
            for d in t.shape.reversed() { Self.put(UInt64(d), &out) }
            Self.put(t.type.rawValue, &out)
            Self.put(UInt64(offset), &out)
            offset = Self.padded(offset + t.data.count, alignment)
        }
        out.append(contentsOf: [UInt8](repeating: 0, count: Self.padded(out.count, alignment) - out.count))
        for t in tensors {
            out.append(contentsOf: t.data)
            out.append(contentsOf: [UInt8](repeating: 0, count: Self.padded(out.count, alignment) - out.count))
        }
        return out
    }

    private static func padded(_ n: Int, _ alignment: Int) -> Int { (n + alignment - 1) / alignment * alignment }

    private static func checkArray(_ value: GGUFValue, key: String) throws {
        guard case .array(let items) = value else { return }
        guard let first = items.first else { throw GraftError.invalid("GGUF metadata '\(key)': an empty array has no element type") }
        let type = typeID(first)
        for item in items {
            guard typeID(item) == type else { throw GraftError.invalid("GGUF metadata '\(key)': array elements of different types") }
            try checkArray(item, key: key)
        }
    }

    private static func typeID(_ v: GGUFValue) -> UInt32 {
        switch v {
        case .uint8: return 0
        case .int8: return 1
        case .uint16: return 2
        case .int16: return 3
        case .uint32: return 4
        case .int32: return 5
        case .float32: return 6
        case .bool: return 7
        case .string: return 8
        case .array: return 9
        case .uint64: return 10
        case .int64: return 11
        case .float64: return 12
        }
    }

    private static func put<T: FixedWidthInteger>(_ v: T, _ out: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) }
    }

    private static func putString(_ s: String, _ out: inout [UInt8]) {
        put(UInt64(s.utf8.count), &out)
        out.append(contentsOf: s.utf8)
    }

    private static func putValue(_ v: GGUFValue, _ out: inout [UInt8]) {
        switch v {
        case .uint8(let x): put(x, &out)
        case .int8(let x): put(x, &out)
        case .uint16(let x): put(x, &out)
        case .int16(let x): put(x, &out)
        case .uint32(let x): put(x, &out)
        case .int32(let x): put(x, &out)
        case .uint64(let x): put(x, &out)
        case .int64(let x): put(x, &out)
        case .float32(let x): put(x.bitPattern, &out)
        case .float64(let x): put(x.bitPattern, &out)
        case .bool(let x): out.append(x ? 1 : 0)
        case .string(let s): putString(s, &out)
        case .array(let items):
            put(items.first.map(typeID) ?? 0, &out)
            put(UInt64(items.count), &out)
            for item in items { putValue(item, &out) }
        }
    }
}
