import GraftTensor

/// One tensor's entry in a GGUF file's tensor table.
public struct GGUFTensorInfo: Sendable, Equatable {
    /// The tensor name as stored (`blk.0.attn_q.weight`).
    public let name: String
    /// Dimensions, outermost first (GGUF stores them innermost first; this is the reverse, like PyTorch).
    public let shape: [Int]
    /// The element format.
    public let type: GGMLType
    /// Absolute byte offset of the data in the file.
    public let offset: Int
    /// Bytes of data.
    public let byteCount: Int

    /// Number of elements.
    public var elementCount: Int { shape.reduce(1, *) }
}

/// A GGUF file (version 2 or 3) opened for reading.
///
/// The header, metadata and tensor table are parsed and validated up front; the file stays memory-mapped
/// and tensor data is dequantized only when requested, straight from the map (no copy of the file).
public final class GGUFFile: @unchecked Sendable {
    /// The path the file was opened from.
    public let path: String
    /// The format version (2 or 3).
    public let version: UInt32
    /// All metadata key/value pairs.
    public let metadata: [String: GGUFValue]
    /// Metadata keys in file order.
    public let metadataKeys: [String]
    /// The tensor table in file order.
    public let tensors: [GGUFTensorInfo]
    /// The alignment of the data section and tensor offsets (`general.alignment`, default 32).
    public let alignment: Int
    /// Absolute offset of the data section.
    public let dataOffset: Int

    private let file: MappedFile
    private let index: [String: Int]

    /// Deepest nesting of arrays accepted in metadata (guards the recursive parser's stack).
    static let maxArrayDepth = 8
    /// Most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
    static let maxDims = 4

    /// Opens and validates the GGUF file at `path`.
    ///
    /// Throws ``GraftError`` naming the file and the fault: `.notFound`/`.io` when the file cannot be
    /// opened or mapped; `.unsupported` for a version other than 2 or 3; `.format` for a bad magic, truncated
    /// header, metadata or strings, counts too large for the file, an unknown value type or ggml type,
    /// overflowing dimensions, a block-size mismatch, or tensor data past the end of the file.
    public convenience init(contentsOf path: String) throws {
        try self.init(file: MappedFile(path: path))
    }

    /// Parses GGUF bytes held in memory (a private copy is kept), validated exactly as a file is; `name` stands
    /// in for the path in messages. The fuzz target `Fuzz/Sources/FuzzGGUF` drives it.
    package convenience init(bytes: UnsafeRawBufferPointer, name: String = "<memory>") throws {
        try self.init(file: MappedFile(bytes: bytes, name: name))
    }

    private init(file: MappedFile) throws {
        let path = file.path
        self.path = path
        self.file = file
        var r = ByteReader(file)

        guard file.size >= 4 else {
            throw r.fault("truncated file: \(file.size) bytes is too short for the GGUF magic")
        }
        let magic = try r.bytes(4, "magic")
        guard Array(magic) == Array("GGUF".utf8) else {
            let hex = magic.map { String($0, radix: 16, uppercase: true) }.joined(separator: " ")
            throw r.fault("bad magic: expected 'GGUF' (47 47 55 46), found \(hex)")
        }
        let version = try r.u32("version")
        guard version == 2 || version == 3 else {
            throw GraftError(.unsupported, "\(path): unsupported GGUF version \(version) (supported: 2 and 3)")
        }
        self.version = version
        let tensorCount = try r.u64("tensor count")
        let kvCount = try r.u64("metadata count")
        // Every key/value takes at least 13 bytes (8-byte key length, 4-byte type, 1-byte value) and every
        // tensor entry at least 24, so larger counts cannot fit in the file.
        guard kvCount <= UInt64(r.remaining / 13) else {
            throw r.fault("metadata count \(kvCount) is impossible for a file of \(file.size) bytes")
        }
        guard tensorCount <= UInt64(r.remaining / 24) else {
            throw r.fault("tensor count \(tensorCount) is impossible for a file of \(file.size) bytes")
        }

        var metadata: [String: GGUFValue] = [:]
        var keys: [String] = []
        keys.reserveCapacity(Int(kvCount))
        for i in 0..<Int(kvCount) {
            r.context = "metadata entry \(i)"
            let key = try GGUFFile.readString(&r, "key")
            r.context = "metadata '\(key)'"
            let type = try r.u32("value type")
            let value = try GGUFFile.readValue(&r, type: type, depth: 0)
            guard metadata[key] == nil else { throw r.fault("duplicate metadata key '\(key)'") }
            metadata[key] = value
            keys.append(key)
        }
        self.metadata = metadata
        self.metadataKeys = keys

        var alignment = 32
        if let a = metadata["general.alignment"] {
            guard let v = a.int, v > 0, v & (v - 1) == 0 else {
                throw r.fault("general.alignment \(a) is not a positive power of two")
            }
            alignment = v
        }
        self.alignment = alignment

        struct RawInfo { let name: String; let shape: [Int]; let type: GGMLType; let relative: UInt64; let count: Int }
        var raw: [RawInfo] = []
        raw.reserveCapacity(Int(tensorCount))
        var index: [String: Int] = [:]
        for i in 0..<Int(tensorCount) {
            r.context = "tensor info \(i)"
            let name = try GGUFFile.readString(&r, "tensor name")
            r.context = "tensor info '\(name)'"
            let nDims = try r.u32("dimension count")
            guard nDims <= UInt32(GGUFFile.maxDims) else {
                throw r.fault("tensor '\(name)' has \(nDims) dimensions (at most \(GGUFFile.maxDims) allowed)")
            }
            var dims: [Int] = []
            var count = 1
            for _ in 0..<Int(nDims) {
                let d = try r.u64("dimension")
                let (p, o) = count.multipliedReportingOverflow(by: Int(clamping: d))
                guard d <= UInt64(Int.max), !o else {
                    throw r.fault("tensor '\(name)' dimensions overflow (dimension \(d) after \(dims))")
                }
                dims.append(Int(d))
                count = p
            }
            let typeRaw = try r.u32("type")
            guard let type = GGMLType(rawValue: typeRaw) else {
                throw r.fault("tensor '\(name)' has unknown ggml type \(typeRaw)")
            }
            let relative = try r.u64("data offset")
            guard index[name] == nil else { throw r.fault("duplicate tensor name '\(name)'") }
            if let inner = dims.first, inner % type.blockSize != 0 {
                throw r.fault("tensor '\(name)' row length \(inner) is not a multiple of the \(type.name) block size \(type.blockSize)")
            }
            index[name] = raw.count
            raw.append(RawInfo(name: name, shape: dims.reversed(), type: type, relative: relative, count: count))
        }

        // The data section starts at the next multiple of the alignment after the tensor table.
        let (aligned, o) = r.offset.addingReportingOverflow(alignment - 1)
        guard !o else { throw r.fault("data section offset overflows") }
        let dataOffset = aligned / alignment * alignment
        self.dataOffset = dataOffset

        var infos: [GGUFTensorInfo] = []
        infos.reserveCapacity(raw.count)
        for t in raw {
            let (bytes, o1) = (t.count / t.type.blockSize).multipliedReportingOverflow(by: t.type.typeSize)
            guard !o1 else { throw r.fault("tensor '\(t.name)' byte size overflows") }
            guard t.relative <= UInt64(file.size),
                  dataOffset + Int(t.relative) <= file.size,
                  bytes <= file.size - (dataOffset + Int(t.relative))
            else {
                let start = t.relative <= UInt64(Int.max - dataOffset) ? String(dataOffset + Int(t.relative)) : "beyond \(Int.max)"
                throw r.fault("tensor '\(t.name)' data [offset \(start), \(bytes) bytes] runs past end of file (size \(file.size))")
            }
            infos.append(GGUFTensorInfo(name: t.name, shape: t.shape, type: t.type,
                                        offset: dataOffset + Int(t.relative), byteCount: bytes))
        }
        self.tensors = infos
        self.index = index
    }

    /// Reads a GGUF string: 8-byte length, then that many UTF-8 bytes.
    private static func readString(_ r: inout ByteReader, _ what: String) throws -> String {
        let n = try r.u64("\(what) length")
        guard n <= UInt64(r.remaining) else {
            throw r.fault("truncated \(r.context): \(what) length \(n) at offset \(r.offset - 8) runs past end of file (size \(r.file.size))")
        }
        let b = try r.bytes(Int(n), what)
        return String(decoding: b, as: UTF8.self)
    }

    /// Smallest encoded size of a value of GGUF type `type` (for bounding array counts); nil if unknown.
    private static func minimumSize(_ type: UInt32) -> Int? {
        switch type {
        case 0, 1, 7: return 1
        case 2, 3: return 2
        case 4, 5, 6: return 4
        case 8, 10, 11, 12: return 8
        case 9: return 12
        default: return nil
        }
    }

    private static func readValue(_ r: inout ByteReader, type: UInt32, depth: Int) throws -> GGUFValue {
        switch type {
        case 0: return .uint8(try r.u8("uint8 value"))
        case 1: return .int8(Int8(bitPattern: try r.u8("int8 value")))
        case 2: return .uint16(try r.load(UInt16.self, "uint16 value"))
        case 3: return .int16(try r.load(Int16.self, "int16 value"))
        case 4: return .uint32(try r.u32("uint32 value"))
        case 5: return .int32(try r.load(Int32.self, "int32 value"))
        case 6: return .float32(Float(bitPattern: try r.u32("float32 value")))
        case 7:
            let b = try r.u8("bool value")
            guard b <= 1 else { throw r.fault("\(r.context): bool value \(b) at offset \(r.offset - 1) is neither 0 nor 1") }
            return .bool(b == 1)
        case 8: return .string(try readString(&r, "string value"))
        case 9:
            guard depth < maxArrayDepth else { throw r.fault("\(r.context): arrays nested deeper than \(maxArrayDepth)") }
            let elementType = try r.u32("array element type")
            guard let minSize = minimumSize(elementType) else {
                throw r.fault("\(r.context): unknown array element type \(elementType)")
            }
            let n = try r.u64("array length")
            guard n <= UInt64(r.remaining / minSize) else {
                throw r.fault("truncated \(r.context): array of \(n) elements of type \(elementType) cannot fit in the \(r.remaining) bytes left (size \(r.file.size))")
            }
            var out: [GGUFValue] = []
            out.reserveCapacity(Int(n))
            for _ in 0..<Int(n) { out.append(try readValue(&r, type: elementType, depth: depth + 1)) }
            return .array(out)
        case 10: return .uint64(try r.u64("uint64 value"))
        case 11: return .int64(try r.load(Int64.self, "int64 value"))
        case 12: return .float64(Double(bitPattern: try r.u64("float64 value")))
        default:
            throw r.fault("\(r.context): unknown value type \(type) at offset \(r.offset - 4)")
        }
    }

    /// The table entry for `name`, or nil.
    public func tensorInfo(_ name: String) -> GGUFTensorInfo? {
        index[name].map { tensors[$0] }
    }

    /// Whether the file holds a tensor called `name`.
    public func contains(_ name: String) -> Bool { index[name] != nil }

    /// The tensor `name` dequantized to Float32, shape outermost first.
    ///
    /// Throws `.notFound` naming the tensor and file, `.unsupported` for ggml types without a dequantizer.
    public func tensor(_ name: String) throws -> Tensor {
        guard let info = tensorInfo(name) else {
            throw GraftError(.notFound, "\(path): no tensor '\(name)' in the file (\(tensors.count) tensors)")
        }
        guard info.type.canDequantize else {
            throw GraftError(.unsupported, "\(path): tensor '\(name)' has type \(info.type.name), which Graft cannot dequantize yet")
        }
        let out = Tensor(zeros: info.shape)
        try info.type.dequantize(file.base + info.offset, into: out.pointer, count: info.elementCount)
        return out
    }

    /// Calls `body` with the tensor's raw stored bytes, straight from the memory map (no copy). The bytes stay
    /// valid as long as this file object lives: keep a reference to it to use them after the call, as
    /// ``QuantizedMatrix``'s `borrowingFrom:` does.
    public func withRawBytes<R>(_ info: GGUFTensorInfo, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let bytes = file.range(info.offset, info.byteCount) else {
            throw GraftError.invalid("\(path): tensor '\(info.name)' byte range is not inside the file")
        }
        return try body(bytes)
    }

    /// Drops the resident pages of `bytes` (from ``withRawBytes(_:_:)``), as a matrix does once it holds its own
    /// repacked copy: the file's map keeps them readable, reloaded from disk on the next access.
    public func releaseResidentPages(_ bytes: UnsafeRawBufferPointer) { file.releaseResidentPages(bytes) }

    /// The string value of metadata `key`, or nil if absent or not a string.
    public func string(_ key: String) -> String? { metadata[key]?.string }
    /// The integer value of metadata `key`, or nil if absent or not an integer.
    public func int(_ key: String) -> Int? { metadata[key]?.int }
    /// The numeric value of metadata `key` as `Float`, or nil if absent or not a number.
    public func float(_ key: String) -> Float? { metadata[key]?.double.map(Float.init) }
    /// The boolean value of metadata `key`, or nil if absent or not a bool.
    public func bool(_ key: String) -> Bool? { metadata[key]?.bool }
}
