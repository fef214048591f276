import Foundation
import GraftTensor

/// A safetensors file opened for reading: the JSON header is parsed and validated up front, the tensor
/// data stays memory-mapped and is converted only when a tensor is requested.
///
/// Layout: an 8-byte little-endian header length `n`, `n` bytes of JSON (an object mapping tensor names
/// to `{"dtype", "shape", "data_offsets"}` plus an optional `"__metadata__"` string map), then the data
/// section that `data_offsets` index into.
public final class SafeTensorsFile: @unchecked Sendable {
    /// One tensor's entry in the header.
    struct Entry {
        let dtype: DType
        let shape: [Int]
        /// Absolute byte range in the file.
        let start: Int
        let end: Int
    }

    /// The path the file was opened from.
    public let path: String
    private let file: MappedFile
    private let entries: [String: Entry]
    private let orderedNames: [String]
    private let meta: [String: String]

    /// The largest header the reference implementation accepts (100 MB).
    static let maxHeaderBytes = 100_000_000

    /// Opens and validates `path`.
    ///
    /// Throws ``GraftError``: `.notFound`/`.io` if the file cannot be opened or mapped, `.format` (naming the
    /// file and the fault) for a truncated file, a header length past the end, a header that is not a JSON
    /// object, an unknown dtype, a shape that disagrees with its byte range, or offsets outside the data
    /// section or overlapping another tensor.
    public convenience init(contentsOf path: String) throws {
        try self.init(mapped: MappedFile(path: path))
    }

    /// Parses safetensors bytes held in memory (a private copy is kept), validated exactly as a file is;
    /// `name` stands in for the path in messages. The fuzz target `Fuzz/Sources/FuzzSafeTensors` drives it.
    package convenience init(bytes: UnsafeRawBufferPointer, name: String = "<memory>") throws {
        try self.init(mapped: MappedFile(bytes: bytes, name: name))
    }

    /// Parses an already mapped file (``SavedDirectory`` hands over the bytes it verified); throws as
    /// ``init(contentsOf:)``.
    init(mapped file: MappedFile) throws {
        let path = file.path
        self.path = path
        self.file = file
        func fault(_ s: String) -> GraftError { GraftError.format("\(path): \(s)") }

        guard file.size >= 8 else {
            throw fault("truncated file: \(file.size) bytes is shorter than the 8-byte header length")
        }
        let n64 = UInt64(littleEndian: file.base.loadUnaligned(as: UInt64.self))
        guard n64 <= UInt64(file.size - 8) else {
            throw fault("header length \(n64) runs past end of file (size \(file.size))")
        }
        let n = Int(n64)
        guard n <= SafeTensorsFile.maxHeaderBytes else {
            throw fault("header length \(n) exceeds the \(SafeTensorsFile.maxHeaderBytes)-byte limit")
        }
        guard n >= 2 else { throw fault("header length \(n) is too small to hold a JSON object") }
        let dataStart = 8 + n
        let dataSize = file.size - dataStart

        let headerData = Data(bytes: file.base + 8, count: n)
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: headerData, options: [])
        } catch {
            throw fault("header is not valid JSON (\(n) bytes at offset 8)")
        }
        guard let object = json as? [String: Any] else {
            throw fault("header JSON is not an object")
        }

        var entries: [String: Entry] = [:]
        var meta: [String: String] = [:]
        for (name, value) in object {
            if name == "__metadata__" {
                guard let m = value as? [String: Any] else { throw fault("'__metadata__' is not an object") }
                for (k, v) in m {
                    guard let s = v as? String else { throw fault("'__metadata__' value for '\(k)' is not a string") }
                    meta[k] = s
                }
                continue
            }
            guard let e = value as? [String: Any] else { throw fault("tensor '\(name)': entry is not an object") }
            guard let dtypeName = e["dtype"] as? String else { throw fault("tensor '\(name)': missing or non-string 'dtype'") }
            guard let dtype = DType(rawValue: dtypeName) else {
                throw fault("tensor '\(name)': unknown dtype '\(dtypeName)'")
            }
            guard let shapeAny = e["shape"] as? [Any] else { throw fault("tensor '\(name)': missing or non-array 'shape'") }
            var shape: [Int] = []
            var elements = 1
            for d in shapeAny {
                guard let v = SafeTensorsFile.nonNegativeInt(d) else {
                    throw fault("tensor '\(name)': shape \(shapeAny) has a dimension that is not a non-negative integer")
                }
                shape.append(v)
                let (p, o) = elements.multipliedReportingOverflow(by: v)
                guard !o else { throw fault("tensor '\(name)': shape \(shape) element count overflows") }
                elements = p
            }
            guard let offs = e["data_offsets"] as? [Any], offs.count == 2,
                  let begin = SafeTensorsFile.nonNegativeInt(offs[0]), let end = SafeTensorsFile.nonNegativeInt(offs[1])
            else { throw fault("tensor '\(name)': 'data_offsets' must be two non-negative integers") }
            guard begin <= end else { throw fault("tensor '\(name)': data_offsets [\(begin), \(end)] are reversed") }
            let (bytes, o) = elements.multipliedReportingOverflow(by: dtype.byteSize)
            guard !o, bytes == end - begin else {
                throw fault("tensor '\(name)': shape \(shape) of \(dtype.rawValue) needs \(o ? "an overflowing number of" : "\(bytes)") bytes but data_offsets [\(begin), \(end)] span \(end - begin)")
            }
            guard end <= dataSize else {
                throw fault("tensor '\(name)': data_offsets [\(begin), \(end)] out of range: the data section has \(dataSize) bytes")
            }
            entries[name] = Entry(dtype: dtype, shape: shape, start: dataStart + begin, end: dataStart + end)
        }

        let ordered = entries.sorted { a, b in
            a.value.start != b.value.start ? a.value.start < b.value.start : (a.value.end != b.value.end ? a.value.end < b.value.end : a.key < b.key)
        }
        var previous: (name: String, end: Int)?
        for (name, e) in ordered where e.end > e.start {
            if let p = previous, e.start < p.end {
                throw fault("tensor '\(name)': data_offsets [\(e.start - dataStart), \(e.end - dataStart)] overlap tensor '\(p.name)' (ends at \(p.end - dataStart))")
            }
            previous = (name, e.end)
        }
        self.entries = entries
        self.orderedNames = ordered.map(\.key)
        self.meta = meta
    }

    /// Accepts JSON integers (not booleans, not fractions) that fit in `Int` and are not negative.
    private static func nonNegativeInt(_ v: Any) -> Int? {
        guard let n = v as? NSNumber else { return nil }
        // JSON true/false arrive as char-typed NSNumbers; reject them as dimensions or offsets.
        if String(cString: n.objCType) == "c" { return nil }
        guard let i = v as? Int else { return nil }  // nil for fractions and out-of-range values
        return i >= 0 ? i : nil
    }

    /// Tensor names in file order (sorted by data offset).
    public var names: [String] { orderedNames }

    /// The optional `__metadata__` string map (empty when absent).
    public var metadata: [String: String] { meta }

    /// Whether the file holds a tensor called `name`.
    public func contains(_ name: String) -> Bool { entries[name] != nil }

    /// The dtype and shape of `name`, or nil if it is not in the file.
    public func info(_ name: String) -> (dtype: DType, shape: [Int])? {
        entries[name].map { ($0.dtype, $0.shape) }
    }

    private func entry(_ name: String) throws -> Entry {
        guard let e = entries[name] else {
            throw GraftError(.notFound, "\(path): no tensor '\(name)' in the file (\(entries.count) tensors)")
        }
        return e
    }

    /// Calls `body` with the raw little-endian bytes of `name`, straight from the memory map (no copy).
    /// The buffer is valid only during the call. Throws `.notFound` naming the key and file.
    public func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let e = try entry(name)
        return try body(UnsafeRawBufferPointer(start: file.base + e.start, count: e.end - e.start))
    }

    /// Reads a floating-point tensor (F32, F16, BF16 or F64) as Float32 with its shape.
    ///
    /// Throws `.notFound` naming the key and file, or `.invalidArgument` for integer dtypes.
    public func tensor(_ name: String) throws -> Tensor {
        let e = try entry(name)
        guard e.dtype.isFloatingPoint else {
            throw GraftError.invalid("\(path): tensor '\(name)' has integer dtype \(e.dtype.rawValue); read it with int64s(_:)")
        }
        let count = e.shape.reduce(1, *)
        let out = Tensor(zeros: e.shape)
        let src = file.base + e.start
        let dst = out.pointer
        switch e.dtype {
        case .f32:
            #if _endian(little)
            UnsafeMutableRawPointer(dst).copyMemory(from: src, byteCount: 4 * count)
            #else
            for i in 0..<count { dst[i] = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
            #endif
        case .f16:
            HalfFloat.decodeF16(src, into: dst, count: count)
        case .bf16:
            HalfFloat.decodeBF16(src, into: dst, count: count)
        case .f64:
            for i in 0..<count {
                dst[i] = Float(Double(bitPattern: UInt64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))))
            }
        default:
            break
        }
        return out
    }

    /// Reads an integer tensor (I64, I32, I16, I8, U32, U16, U8, BOOL, or U64 values that fit) as flat Int64s
    /// in row-major order. Throws `.notFound` naming the key and file, `.invalidArgument` for float dtypes,
    /// `.format` for a U64 value above `Int64.max`.
    public func int64s(_ name: String) throws -> [Int64] {
        let e = try entry(name)
        guard e.dtype.isInteger else {
            throw GraftError.invalid("\(path): tensor '\(name)' has float dtype \(e.dtype.rawValue); read it with tensor(_:)")
        }
        let count = e.shape.reduce(1, *)
        let src = file.base + e.start
        var out = [Int64](repeating: 0, count: count)
        var bad: Int?
        out.withUnsafeMutableBufferPointer { o in
            switch e.dtype {
            case .i64:
                for i in 0..<count { o[i] = Int64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
            case .u64:
                for i in 0..<count {
                    let v = UInt64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
                    if v > UInt64(Int64.max) { bad = i; return }
                    o[i] = Int64(v)
                }
            case .i32:
                for i in 0..<count { o[i] = Int64(Int32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))) }
            case .u32:
                for i in 0..<count { o[i] = Int64(UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
            case .i16:
                for i in 0..<count { o[i] = Int64(Int16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))) }
            case .u16:
                for i in 0..<count { o[i] = Int64(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) }
            case .i8:
                for i in 0..<count { o[i] = Int64(src.load(fromByteOffset: i, as: Int8.self)) }
            case .u8, .bool:
                for i in 0..<count { o[i] = Int64(src.load(fromByteOffset: i, as: UInt8.self)) }
            default:
                break
            }
        }
        if let bad {
            throw GraftError.format("\(path): tensor '\(name)' element \(bad) does not fit in Int64")
        }
        return out
    }
}
