#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import GraftTensor

/// The text of the current `errno`, for error messages.
func errnoText(_ code: Int32 = errno) -> String {
    guard let p = strerror(code) else { return "errno \(code)" }
    return String(cString: p)
}

/// Reads the whole file at `path`.
///
/// Throws ``GraftError`` `.notFound` if the file does not exist and `.io` if it cannot be opened or read,
/// naming the path and the system's reason.
public func readFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else {
        let e = errno
        throw GraftError(e == ENOENT ? .notFound : .io, "\(path): cannot open for reading: \(errnoText(e))")
    }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw GraftError.io("\(path): cannot stat: \(errnoText())") }
    guard (st.st_mode & S_IFMT) == S_IFREG else { throw GraftError.io("\(path): not a regular file") }
    let size = Int(st.st_size)
    var bytes = [UInt8](repeating: 0, count: size)
    var done = 0
    try bytes.withUnsafeMutableBytes { buf in
        while done < size {
            guard let base = buf.baseAddress else { return }
            let n = read(fd, base + done, size - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw GraftError.io("\(path): read failed after \(done) of \(size) bytes: \(errnoText())")
            }
            if n == 0 { break }
            done += n
        }
    }
    if done < size { bytes.removeLast(size - done) }
    return bytes
}

/// Crash-safe file replacement: the new contents appear at `path` completely or not at all.
///
/// The bytes go to a temporary file in the same directory, which is flushed (`fsync`), renamed over
/// `path`, and then the directory itself is flushed so the rename survives a power loss.
public enum AtomicFile {
    /// Atomically replaces (or creates) the file at `path` with `bytes`.
    ///
    /// Throws ``GraftError`` `.io` naming the path and the step that failed; the temporary file is removed
    /// on failure and `path` is left as it was.
    public static func write(_ bytes: [UInt8], to path: String) throws {
        try bytes.withUnsafeBytes { try write(buffer: $0, to: path) }
    }

    /// Atomically replaces (or creates) the file at `path` with `data`.
    public static func write(_ data: Data, to path: String) throws {
        try data.withUnsafeBytes { try write(buffer: $0, to: path) }
    }

    /// Atomically replaces (or creates) the file at `path` with the bytes in `buffer`.
    public static func write(buffer: UnsafeRawBufferPointer, to path: String) throws {
        try write(to: path) { fd, tmp in
            try writeAll(fd: fd, buffer, path: tmp)
        }
    }

    /// Atomically replaces (or creates) the file at `path` with bytes produced by `body`, which writes to
    /// the open descriptor it is given (use ``writeAll(fd:_:path:)``); the second argument names the
    /// temporary file for messages.
    public static func write(to path: String, _ body: (Int32, String) throws -> Void) throws {
        let dir = directory(of: path)
        let base = path.split(separator: "/", omittingEmptySubsequences: false).last.map(String.init) ?? path
        guard !base.isEmpty else { throw GraftError.invalid("\(path): not a file path") }
        var template = Array("\(dir)/.\(base).tmp-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { buf -> Int32 in
            guard let p = buf.baseAddress else { return -1 }
            return mkstemp(p)
        }
        guard fd >= 0 else {
            throw GraftError.io("\(path): cannot create a temporary file in '\(dir)': \(errnoText())")
        }
        let tmp = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var closed = false
        do {
            try body(fd, tmp)
            guard fsync(fd) == 0 else { throw GraftError.io("\(path): fsync of temporary file failed: \(errnoText())") }
            // Give the file ordinary permissions (mkstemp creates 0600), honouring the umask.
            let mask = umask(0); umask(mask)
            fchmod(fd, 0o666 & ~mask)
            closed = true
            guard close(fd) == 0 else { throw GraftError.io("\(path): close of temporary file failed: \(errnoText())") }
            guard rename(tmp, path) == 0 else {
                throw GraftError.io("\(path): cannot rename temporary file into place: \(errnoText())")
            }
        } catch {
            if !closed { close(fd) }
            unlink(tmp)
            throw error
        }
        syncDirectory(dir)
    }

    /// Writes all of `buffer` to `fd`, retrying short writes and `EINTR`.
    public static func writeAll(fd: Int32, _ buffer: UnsafeRawBufferPointer, path: String) throws {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let n = systemWrite(fd, base + done, buffer.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw GraftError.io("\(path): write failed after \(done) of \(buffer.count) bytes: \(errnoText())")
            }
            done += n
        }
    }

    private static func systemWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
        #if canImport(Glibc)
        return Glibc.write(fd, p, n)
        #else
        return Darwin.write(fd, p, n)
        #endif
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let dir = String(path[..<slash])
        return dir.isEmpty ? "/" : dir
    }

    /// Flushes a directory entry; failures are ignored because some file systems cannot fsync directories.
    static func syncDirectory(_ dir: String) {
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { return }
        _ = fsync(dfd)
        close(dfd)
    }
}
