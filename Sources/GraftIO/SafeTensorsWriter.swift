import GraftTensor

/// Builds a safetensors file in memory and writes it atomically.
///
/// Output matches the reference implementation's layout: 8-byte little-endian header length, a compact JSON
/// header (`__metadata__` first, then tensor names sorted) padded with spaces to a multiple of 8 bytes, then
/// the tensors' data in name order. Output is deterministic: the same tensors give the same bytes.
public struct SafeTensorsWriter {
    private struct Pending {
        let dtype: DType
        let shape: [Int]
        let bytes: [UInt8]
    }

    private var pending: [String: Pending] = [:]

    /// String metadata written under `"__metadata__"` (omitted when empty).
    public var metadata: [String: String] = [:]

    /// Creates an empty writer.
    public init() {}

    private func checkName(_ name: String) throws {
        guard !name.isEmpty else { throw GraftError.invalid("safetensors: tensor name is empty") }
        guard name != "__metadata__" else { throw GraftError.invalid("safetensors: '__metadata__' is reserved and cannot name a tensor") }
        guard pending[name] == nil else { throw GraftError.invalid("safetensors: tensor '\(name)' added twice") }
    }

    private static func elementCount(_ shape: [Int], _ name: String) throws -> Int {
        var n = 1
        for d in shape {
            guard d >= 0 else { throw GraftError.invalid("safetensors: tensor '\(name)' has negative dimension in shape \(shape)") }
            let (p, o) = n.multipliedReportingOverflow(by: d)
            guard !o else { throw GraftError.invalid("safetensors: tensor '\(name)' shape \(shape) overflows") }
            n = p
        }
        return n
    }

    /// Adds a float tensor, stored as `dtype` (`.f32`, `.f16`, `.bf16` or `.f64`); narrowing rounds to
    /// nearest even. The values are copied now. Throws `.invalidArgument` for a duplicate or reserved name or
    /// a non-float dtype.
    public mutating func add(_ name: String, _ tensor: Tensor, as dtype: DType = .f32) throws {
        try checkName(name)
        guard dtype.isFloatingPoint else {
            throw GraftError.invalid("safetensors: tensor '\(name)' cannot be stored as \(dtype.rawValue); use a float dtype")
        }
        let count = tensor.count
        var bytes = [UInt8](repeating: 0, count: count * dtype.byteSize)
        let src = UnsafePointer(tensor.pointer)
        bytes.withUnsafeMutableBytes { raw in
            guard let dst = raw.baseAddress else { return }
            switch dtype {
            case .f32:
                #if _endian(little)
                dst.copyMemory(from: src, byteCount: 4 * count)
                #else
                for i in 0..<count { dst.storeBytes(of: src[i].bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
                #endif
            case .f16:
                HalfFloat.encodeF16(src, into: dst, count: count)
            case .bf16:
                HalfFloat.encodeBF16(src, into: dst, count: count)
            case .f64:
                for i in 0..<count { dst.storeBytes(of: Double(src[i]).bitPattern.littleEndian, toByteOffset: 8 * i, as: UInt64.self) }
            default:
                break
            }
        }
        pending[name] = Pending(dtype: dtype, shape: tensor.shape, bytes: bytes)
    }

    /// Adds an I64 tensor. Throws `.invalidArgument` if `int64s.count` is not the product of `shape`.
    public mutating func add(_ name: String, int64s: [Int64], shape: [Int]) throws {
        try addIntegers(name, int64s, shape: shape, dtype: .i64)
    }

    /// Adds an I32 tensor. Throws `.invalidArgument` if `int32s.count` is not the product of `shape`.
    public mutating func add(_ name: String, int32s: [Int32], shape: [Int]) throws {
        try addIntegers(name, int32s, shape: shape, dtype: .i32)
    }

    /// Adds a one-dimensional U8 tensor of raw bytes (packed bits, codes).
    public mutating func add(_ name: String, uint8s: [UInt8]) throws {
        try addIntegers(name, uint8s, shape: [uint8s.count], dtype: .u8)
    }

    private mutating func addIntegers<T: FixedWidthInteger>(_ name: String, _ values: [T], shape: [Int], dtype: DType) throws {
        try checkName(name)
        let n = try SafeTensorsWriter.elementCount(shape, name)
        guard n == values.count else {
            throw GraftError.invalid("safetensors: tensor '\(name)' has \(values.count) values but shape \(shape) needs \(n)")
        }
        let bytes = values.map { $0.littleEndian }.withUnsafeBytes { Array($0) }
        pending[name] = Pending(dtype: dtype, shape: shape, bytes: bytes)
    }

    /// The JSON header (unpadded) and the tensor names in data order.
    ///
    /// Like the reference writer: `__metadata__` first, then tensors in data order (here: names sorted by
    /// UTF-8 bytes), each entry's fields in the order `dtype`, `shape`, `data_offsets`, no whitespace.
    private func header() -> (json: [UInt8], order: [String]) {
        let order = pending.keys.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
        var items: [String] = []
        if !metadata.isEmpty {
            let keys = metadata.keys.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
            let body = keys.map { "\(jsonString($0)):\(jsonString(metadata[$0] ?? ""))" }.joined(separator: ",")
            items.append("\"__metadata__\":{\(body)}")
        }
        var offset = 0
        for name in order {
            guard let p = pending[name] else { continue }
            let shape = p.shape.map(String.init).joined(separator: ",")
            items.append("\(jsonString(name)):{\"dtype\":\"\(p.dtype.rawValue)\",\"shape\":[\(shape)],\"data_offsets\":[\(offset),\(offset + p.bytes.count)]}")
            offset += p.bytes.count
        }
        return (Array(("{" + items.joined(separator: ",") + "}").utf8), order)
    }

    /// The complete file contents.
    public func serialized() -> [UInt8] {
        var (json, order) = header()
        json.append(contentsOf: [UInt8](repeating: 0x20, count: (8 - json.count % 8) % 8))
        var out: [UInt8] = []
        out.reserveCapacity(8 + json.count + order.reduce(0) { $0 + (pending[$1]?.bytes.count ?? 0) })
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: json)
        for name in order { out.append(contentsOf: pending[name]?.bytes ?? []) }
        return out
    }

    /// Writes the file atomically (temporary file, fsync, rename, directory fsync).
    /// Throws `.io` naming the path and the failing step.
    public func write(to path: String) throws {
        var (json, order) = header()
        json.append(contentsOf: [UInt8](repeating: 0x20, count: (8 - json.count % 8) % 8))
        let lengthPrefix = withUnsafeBytes(of: UInt64(json.count).littleEndian) { Array($0) }
        try AtomicFile.write(to: path) { fd, tmp in
            try lengthPrefix.withUnsafeBytes { try AtomicFile.writeAll(fd: fd, $0, path: tmp) }
            try json.withUnsafeBytes { try AtomicFile.writeAll(fd: fd, $0, path: tmp) }
            for name in order {
                try pending[name]?.bytes.withUnsafeBytes { try AtomicFile.writeAll(fd: fd, $0, path: tmp) }
            }
        }
    }
}

/// A JSON string literal for `s`, escaping quotes, backslashes and control characters.
func jsonString(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case _ where u.value < 0x20:
            let hex = String(u.value, radix: 16)
            out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        default: out.unicodeScalars.append(u)
        }
    }
    return out + "\""
}
