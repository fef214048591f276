#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import GraftTensor

/// A read-only memory map of a whole file, or a private copy of bytes already in memory (what the fuzz targets
/// and in-memory readers parse). The mapping lives as long as the object.
///
/// Every access goes through ``bytes(at:count:_:)``-style bounds checks done by the callers' readers;
/// the map itself never traps on file contents.
final class MappedFile: @unchecked Sendable {
    /// The file's path, for messages.
    let path: String
    /// The file size in bytes.
    let size: Int
    /// The first byte (a dummy non-null pointer for an empty file).
    let base: UnsafeRawPointer
    private let mapped: UnsafeMutableRawPointer?
    /// Memory this object allocated (the bytes of an in-memory file, or a placeholder for an empty file).
    private let owned: UnsafeMutableRawPointer?

    /// Maps `path` read-only. Throws `.notFound` if it does not exist, `.io` if it cannot be opened or mapped.
    init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            throw GraftError(e == ENOENT ? .notFound : .io, "\(path): cannot open for reading: \(errnoText(e))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw GraftError.io("\(path): cannot stat: \(errnoText())") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw GraftError.io("\(path): not a regular file") }
        size = Int(st.st_size)
        if size == 0 {
            // mmap rejects length 0; an empty file gets a small private allocation nothing reads from.
            let p = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
            owned = p
            mapped = nil
            base = UnsafeRawPointer(p)
            return
        }
        guard let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            throw GraftError.io("\(path): cannot memory-map \(size) bytes: \(errnoText())")
        }
        mapped = p
        owned = nil
        base = UnsafeRawPointer(p)
    }

    /// A copy of `bytes` that the readers parse exactly as a file; `name` stands in for the path in messages.
    /// The copy is a heap allocation of exactly `bytes.count` bytes, so AddressSanitizer catches a read past it.
    init(bytes: UnsafeRawBufferPointer, name: String) {
        path = name
        size = bytes.count
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        if let src = bytes.baseAddress, bytes.count > 0 { p.copyMemory(from: src, byteCount: bytes.count) }
        owned = p
        mapped = nil
        base = UnsafeRawPointer(p)
    }

    deinit {
        if let mapped { munmap(mapped, size) }
        owned?.deallocate()
    }

    /// Drops the resident pages wholly inside `bytes` (which must lie in this map) from the process's memory: they
    /// stay readable and come back from the file on the next access. Does nothing for in-memory bytes, which have no
    /// file behind them. The map is read-only, so no page was ever modified.
    func releaseResidentPages(_ bytes: UnsafeRawBufferPointer) {
        guard let mapped, let start = bytes.baseAddress, bytes.count > 0,
              start >= UnsafeRawPointer(mapped), start + bytes.count <= UnsafeRawPointer(mapped) + size else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard page > 0 else { return }
        let first = (Int(bitPattern: start) + page - 1) / page * page
        let end = (Int(bitPattern: start) + bytes.count) / page * page
        guard end > first, let pointer = UnsafeMutableRawPointer(bitPattern: first) else { return }
        _ = madvise(pointer, end - first, Int32(MADV_DONTNEED))
    }

    /// The bytes `[offset, offset + count)` if they lie inside the file, else nil.
    func range(_ offset: Int, _ count: Int) -> UnsafeRawBufferPointer? {
        guard offset >= 0, count >= 0, offset <= size, count <= size - offset else { return nil }
        return UnsafeRawBufferPointer(start: base + offset, count: count)
    }
}

/// A bounds-checked little-endian cursor over a mapped file, used by the header parsers.
struct ByteReader {
    let file: MappedFile
    /// The current offset from the start of the file.
    var offset: Int
    /// What is being parsed, for messages ("metadata key 3", "tensor info 12").
    var context: String = "header"

    init(_ file: MappedFile, offset: Int = 0) {
        self.file = file
        self.offset = offset
    }

    var remaining: Int { file.size - offset }

    func fault(_ what: String) -> GraftError {
        GraftError.format("\(file.path): \(what)")
    }

    /// Ensures `count` more bytes are available, else throws a truncation error naming `what`.
    func need(_ count: Int, _ what: String) throws {
        guard count >= 0, count <= remaining else {
            throw fault("truncated \(context): \(what) needs \(count) bytes at offset \(offset) but the file has \(remaining) left (size \(file.size))")
        }
    }

    mutating func load<T: FixedWidthInteger>(_: T.Type, _ what: String) throws -> T {
        let n = MemoryLayout<T>.size
        try need(n, what)
        let v = (file.base + offset).loadUnaligned(as: T.self)
        offset += n
        return T(littleEndian: v)
    }

    mutating func u8(_ what: String) throws -> UInt8 { try load(UInt8.self, what) }
    mutating func u32(_ what: String) throws -> UInt32 { try load(UInt32.self, what) }
    mutating func u64(_ what: String) throws -> UInt64 { try load(UInt64.self, what) }

    /// Reads `count` raw bytes.
    mutating func bytes(_ count: Int, _ what: String) throws -> UnsafeRawBufferPointer {
        try need(count, what)
        let b = UnsafeRawBufferPointer(start: file.base + offset, count: count)
        offset += count
        return b
    }
}
