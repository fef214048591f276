#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CGraftSystem
import Foundation
import GraftTensor

/// Crash-safe saving of a directory of several files (an adapter, a checkpoint) as one unit.
///
/// Every save also writes a manifest, ``manifestName``, listing each file with its size and SHA-256, so a
/// reader (``SavedDirectory``) can tell a complete save from a mix of two saves.
///
/// - A directory that holds nothing but the files of earlier saves (the usual case: an adapter or checkpoint
///   directory of its own) is replaced as a whole: the files and the manifest are written into a hidden
///   staging directory beside it (`.<name>.graft-staging-XXXXXX`), each file fsynced, then the staging
///   directory is fsynced and atomically exchanged with the old one (Linux `renameat2(RENAME_EXCHANGE)`), the
///   parent directory is fsynced and the old files are removed. A process killed at any moment leaves either
///   the complete previous save or the complete new one; a staging directory it leaves behind is removed
///   by the next save of the same directory.
/// - A directory that also holds other files (say a training output directory with `checkpoint-*`
///   folders) is never replaced, so nothing of the user's is deleted. Its files are replaced one by one,
///   each atomically, and the new manifest is written first: an interrupted save then leaves files that
///   disagree with the manifest, which ``SavedDirectory`` reports as an error instead of loading them.
///   The same happens where the file system cannot exchange directories.
public enum AtomicDirectory {
    /// The manifest's file name inside a saved directory.
    public static let manifestName = "graft_manifest.json"
    /// The manifest's `format` value.
    static let manifestFormat = "graft-manifest"
    /// Marks staging directories beside the target: `.<name>.graft-staging-XXXXXX`.
    static let stagingMarker = ".graft-staging-"

    /// How a save went in.
    public enum Mode: Sendable, Equatable {
        /// The directory was replaced as a whole (or created): all or nothing.
        case replaced
        /// The files were replaced one by one beside other content; an interruption is detected on load.
        case inPlace
    }

    /// Saves `files` (names without slashes, contents) into `directory` with a manifest of kind `kind`
    /// (e.g. `"adapter"`, `"checkpoint"`) and string `metadata`, as described on ``AtomicDirectory``.
    /// Creates the directory and its parents when missing.
    ///
    /// Throws ``GraftError`` `.invalidArgument` for a bad file name or a `directory` that is not a directory,
    /// `.io` naming the path and step that failed; on failure the previous contents are left as they were
    /// (whole-directory mode) or detected as incomplete on load (in-place mode).
    @discardableResult
    public static func write(directory: String, kind: String, files: [(name: String, bytes: [UInt8])],
                             metadata: [String: String] = [:]) throws -> Mode {
        for (name, _) in files {
            guard !name.isEmpty, !name.contains("/"), name != ".", name != "..", name != manifestName else {
                throw GraftError.invalid("\(directory): '\(name)' cannot be saved as a file of the directory")
            }
        }
        let manifest = try manifestBytes(kind: kind, files: files, metadata: metadata)
        let dir = trimmed(directory)
        guard !dir.isEmpty else { throw GraftError.invalid("directory: the path is empty") }
        let parent = AtomicFile.directory(of: dir)
        let base = dir.split(separator: "/").last.map(String.init) ?? dir
        let swappable = base != "." && base != ".." && dir != "/"

        var st = stat()
        let exists: Bool
        if lstat(dir, &st) == 0 {
            exists = true
            let type = st.st_mode & S_IFMT
            if type == S_IFLNK {
                // A symbolic link stays a link: the files behind it are replaced in place.
                var target = stat()
                guard stat(dir, &target) == 0, (target.st_mode & S_IFMT) == S_IFDIR else {
                    throw GraftError.invalid("\(dir): exists and is not a directory")
                }
                try writeInPlace(dir, files: files, manifest: manifest)
                return .inPlace
            }
            guard type == S_IFDIR else { throw GraftError.invalid("\(dir): exists and is not a directory") }
        } else {
            let e = errno
            guard e == ENOENT else { throw GraftError.io("\(dir): cannot inspect: \(errnoText(e))") }
            exists = false
            try createDirectories(parent)
        }
        let ownDirectory = try !exists || onlyOwnEntries(dir, files: files)
        if swappable, ownDirectory {
            if try writeReplacing(dir, parent: parent, base: base, exists: exists, files: files, manifest: manifest) {
                return .replaced
            }
        }
        try writeInPlace(dir, files: files, manifest: manifest)
        return .inPlace
    }

    /// The manifest's JSON: format, version, kind, metadata, and each file's size and SHA-256.
    static func manifestBytes(kind: String, files: [(name: String, bytes: [UInt8])],
                              metadata: [String: String]) throws -> [UInt8] {
        var listed: [String: Any] = [:]
        for (name, bytes) in files {
            listed[name] = ["size": bytes.count, "sha256": SHA256.hex(bytes)] as [String: Any]
        }
        let object: [String: Any] = [
            "format": manifestFormat, "version": 1, "kind": kind, "metadata": metadata, "files": listed,
        ]
        let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        return [UInt8](data)
    }

    /// Whether `dir` holds only what saves write there: the files of this save, the names its current
    /// manifest lists, the manifest, and temporary files left by interrupted ``AtomicFile`` writes of those.
    static func onlyOwnEntries(_ dir: String, files: [(name: String, bytes: [UInt8])]) throws -> Bool {
        let entries: [String]
        do {
            entries = try FileManager.default.contentsOfDirectory(atPath: dir)
        } catch {
            throw GraftError.io("\(dir): cannot list the directory (\(error.localizedDescription))")
        }
        var own = Set(files.map(\.name))
        own.insert(manifestName)
        if let listed = try? SavedDirectory.readManifest(directory: dir) { own.formUnion(listed.files.keys) }
        return entries.allSatisfy { entry in
            if own.contains(entry) { return true }
            // AtomicFile's temporary names: ".<name>.tmp-XXXXXX".
            guard entry.hasPrefix("."), let tmp = entry.range(of: ".tmp-", options: .backwards) else { return false }
            return own.contains(String(entry[entry.index(after: entry.startIndex)..<tmp.lowerBound]))
        }
    }

    /// Whole-directory mode. Returns false (having changed nothing) when the file system cannot exchange
    /// directories, so the caller falls back to in-place mode.
    static func writeReplacing(_ dir: String, parent: String, base: String, exists: Bool,
                               files: [(name: String, bytes: [UInt8])], manifest: [UInt8]) throws -> Bool {
        removeStaleStaging(parent: parent, base: base)
        var template = Array("\(parent)/.\(base)\(stagingMarker)XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buf -> Bool in
            guard let p = buf.baseAddress else { return false }
            return mkdtemp(p) != nil
        }
        guard made else { throw GraftError.io("\(dir): cannot create a staging directory in '\(parent)': \(errnoText())") }
        let staging = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var swapped = false
        defer { if !swapped { removeTree(staging) } }
        // mkdtemp makes the directory 0700; give it ordinary permissions, honouring the umask.
        let mask = umask(0); umask(mask)
        chmod(staging, 0o777 & ~mask)
        for (name, bytes) in files { try writeNewFile(staging + "/" + name, bytes, reportAs: dir + "/" + name) }
        try writeNewFile(staging + "/" + manifestName, manifest, reportAs: dir + "/" + manifestName)
        try syncDirectoryChecked(staging, reportAs: dir)
        TestHooks.pauseBeforeCommit()
        if exists {
            if cgraft_exchange_paths(staging, dir) != 0 {
                let e = errno
                if e == EINVAL || e == ENOSYS || e == ENOTSUP || e == EOPNOTSUPP { return false }
                throw GraftError.io("\(dir): cannot swap the new save into place: \(errnoText(e))")
            }
        } else {
            guard rename(staging, dir) == 0 else {
                throw GraftError.io("\(dir): cannot move the new save into place: \(errnoText())")
            }
        }
        swapped = true
        AtomicFile.syncDirectory(parent)
        // After an exchange the staging path holds the previous save; a kill before this removal leaves it
        // for the next save to clear.
        if exists { removeTree(staging) }
        return true
    }

    /// In-place mode: the new manifest first, then each file atomically.
    static func writeInPlace(_ dir: String, files: [(name: String, bytes: [UInt8])], manifest: [UInt8]) throws {
        try createDirectories(dir)
        try AtomicFile.write(manifest, to: dir + "/" + manifestName)
        for (name, bytes) in files { try AtomicFile.write(bytes, to: dir + "/" + name) }
    }

    /// Creates a new file (it must not exist), writes `bytes`, fsyncs and closes it.
    static func writeNewFile(_ path: String, _ bytes: [UInt8], reportAs: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
        guard fd >= 0 else { throw GraftError.io("\(reportAs): cannot create '\(path)': \(errnoText())") }
        var closed = false
        defer { if !closed { close(fd) } }
        try bytes.withUnsafeBytes { try AtomicFile.writeAll(fd: fd, $0, path: path) }
        TestHooks.pauseBetweenFiles()
        guard fsync(fd) == 0 else { throw GraftError.io("\(reportAs): fsync of '\(path)' failed: \(errnoText())") }
        closed = true
        guard close(fd) == 0 else { throw GraftError.io("\(reportAs): close of '\(path)' failed: \(errnoText())") }
    }

    static func syncDirectoryChecked(_ dir: String, reportAs: String) throws {
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { throw GraftError.io("\(reportAs): cannot open '\(dir)' to fsync it: \(errnoText())") }
        defer { close(dfd) }
        // Some file systems cannot fsync a directory (EINVAL); the data files themselves are already synced.
        if fsync(dfd) != 0, errno != EINVAL {
            throw GraftError.io("\(reportAs): fsync of '\(dir)' failed: \(errnoText())")
        }
    }

    /// Removes staging directories of `base` left in `parent` by interrupted saves.
    static func removeStaleStaging(parent: String, base: String) {
        let prefix = "." + base + stagingMarker
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: parent) else { return }
        for entry in entries where entry.hasPrefix(prefix) && entry.count == prefix.count + 6 {
            removeTree(parent + "/" + entry)
        }
    }

    static func removeTree(_ path: String) {
        try? FileManager.default.removeItem(atPath: path)
    }

    static func createDirectories(_ dir: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        } catch {
            throw GraftError.io("\(dir): cannot create directory (\(error.localizedDescription))")
        }
    }

    /// `path` without trailing slashes (but "/" stays "/").
    static func trimmed(_ path: String) -> String {
        var p = Substring(path)
        while p.count > 1, p.hasSuffix("/") { p = p.dropLast() }
        return String(p)
    }
}

/// Test hooks for the crash tests (tests/crash): `GRAFT_TEST_SAVE_PAUSE_MS=n` makes whole-directory saves
/// sleep `n` milliseconds after writing each staged file and before the swap, so a test that kills the
/// process at random moments lands inside saves more often. Unset (the default) it costs one environment
/// lookup per process. Not for production use.
enum TestHooks {
    static let pauseMicroseconds: UInt32 = {
        guard let text = ProcessInfo.processInfo.environment["GRAFT_TEST_SAVE_PAUSE_MS"],
              let ms = UInt32(text), ms > 0 else { return 0 }
        return min(ms, 10_000) * 1000
    }()

    static func pauseBetweenFiles() {
        if pauseMicroseconds > 0 { usleep(pauseMicroseconds) }
    }

    static func pauseBeforeCommit() {
        if pauseMicroseconds > 0 { usleep(pauseMicroseconds) }
    }
}
