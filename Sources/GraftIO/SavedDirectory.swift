import Foundation
import GraftTensor

/// A saved directory (adapter, checkpoint) opened for reading, its files checked against the manifest
/// ``AtomicDirectory`` writes.
///
/// With a manifest, every file it lists is memory-mapped and its size and SHA-256 compared before anything is
/// parsed, and readers get exactly those verified bytes: a directory that mixes files of two saves (an
/// interrupted save, a file replaced by hand) is an error naming the file, never loaded. Without a manifest
/// (a directory written by PEFT or another tool) files are read as they are.
public final class SavedDirectory: @unchecked Sendable {
    /// What a manifest records.
    public struct Manifest: Sendable {
        /// The kind of save, e.g. `"adapter"` or `"checkpoint"`.
        public let kind: String
        /// Each saved file's name with its size in bytes and lowercase hex SHA-256.
        public let files: [String: (size: Int, sha256: String)]
        /// The saver's string metadata (a checkpoint's `global_step`, ...).
        public let metadata: [String: String]
    }

    /// The directory's path.
    public let path: String
    /// The verified manifest, or nil when the directory has none.
    public let manifest: Manifest?
    private let verified: [String: MappedFile]

    /// Opens `path`, verifying the files its manifest lists.
    ///
    /// Throws ``GraftError`` `.format` for a malformed manifest, a listed file that is missing, or one whose
    /// size or SHA-256 differs from the manifest (the message names the file and says the directory mixes
    /// saves); `.io` when a file cannot be read.
    public init(path: String) throws {
        self.path = path
        guard let manifest = try SavedDirectory.readManifest(directory: path) else {
            self.manifest = nil
            self.verified = [:]
            return
        }
        let manifestPath = path + "/" + AtomicDirectory.manifestName
        var verified: [String: MappedFile] = [:]
        for (name, expected) in manifest.files.sorted(by: { $0.key < $1.key }) {
            let filePath = path + "/" + name
            let file: MappedFile
            do {
                file = try MappedFile(path: filePath)
            } catch let e as GraftError where e.code == .notFound {
                throw GraftError.format("\(filePath): missing, but \(manifestPath) lists it: the directory holds only part of a save (an interrupted save, or a file deleted by hand)")
            }
            let digest = SHA256.hex(UnsafeRawBufferPointer(start: file.base, count: file.size))
            guard file.size == expected.size, digest == expected.sha256 else {
                throw GraftError.format("\(filePath): does not match \(manifestPath) (\(file.size) bytes, sha256 \(digest.prefix(12))…; the manifest says \(expected.size) bytes, sha256 \(expected.sha256.prefix(12))…): the directory mixes files of different saves (an interrupted save, or a file replaced by hand; if you replaced it on purpose, delete \(AtomicDirectory.manifestName))")
            }
            verified[name] = file
        }
        self.manifest = manifest
        self.verified = verified
    }

    /// Whether the directory holds a regular file `name` (verified or not).
    public func contains(_ name: String) -> Bool {
        if verified[name] != nil { return true }
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path + "/" + name, isDirectory: &isDirectory) && !isDirectory.boolValue
    }

    /// The bytes of file `name`: the verified ones when the manifest lists it, else read from disk
    /// (throws `.notFound` / `.io` naming the path).
    public func contents(_ name: String) throws -> [UInt8] {
        if let file = verified[name] { return Array(UnsafeRawBufferPointer(start: file.base, count: file.size)) }
        return try readFile(path + "/" + name)
    }

    /// File `name` as a safetensors file, from the verified bytes when the manifest lists it.
    public func safeTensors(_ name: String) throws -> SafeTensorsFile {
        if let file = verified[name] { return try SafeTensorsFile(mapped: file) }
        return try SafeTensorsFile(contentsOf: path + "/" + name)
    }

    /// Reads and validates `directory`'s manifest; nil when there is none.
    static func readManifest(directory: String) throws -> Manifest? {
        let manifestPath = directory + "/" + AtomicDirectory.manifestName
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: manifestPath, isDirectory: &isDirectory) else { return nil }
        let bytes = try readFile(manifestPath)
        func fault(_ s: String) -> GraftError { GraftError.format("\(manifestPath): \(s)") }
        guard let object = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any] else {
            throw fault("not a JSON object (a damaged manifest)")
        }
        guard object["format"] as? String == AtomicDirectory.manifestFormat else {
            throw fault("'format' is not \"\(AtomicDirectory.manifestFormat)\"")
        }
        guard let version = object["version"] as? Int, version == 1 else {
            throw fault("unsupported 'version' \(object["version"].map { "\($0)" } ?? "(missing)"); this Graft reads version 1")
        }
        guard let kind = object["kind"] as? String else { throw fault("needs a string 'kind'") }
        guard let listed = object["files"] as? [String: Any] else { throw fault("needs an object 'files'") }
        var files: [String: (size: Int, sha256: String)] = [:]
        for (name, value) in listed {
            guard !name.isEmpty, !name.contains("/"), name != ".", name != "..", name != AtomicDirectory.manifestName else {
                throw fault("'files' lists '\(name)', which is not a file name of the directory")
            }
            guard let entry = value as? [String: Any], let size = entry["size"] as? Int, size >= 0,
                  let sha = entry["sha256"] as? String, sha.count == 64,
                  sha.allSatisfy({ $0.isHexDigit && !$0.isUppercase }) else {
                throw fault("'files'.'\(name)' needs a non-negative integer 'size' and a 64-digit lowercase hex 'sha256'")
            }
            files[name] = (size, sha)
        }
        var metadata: [String: String] = [:]
        if let m = object["metadata"] {
            guard let map = m as? [String: Any] else { throw fault("'metadata' is not an object") }
            for (k, v) in map {
                guard let s = v as? String else { throw fault("'metadata'.'\(k)' is not a string") }
                metadata[k] = s
            }
        }
        return Manifest(kind: kind, files: files, metadata: metadata)
    }
}
