import Foundation
import Graft

/// A file or directory path a client sent, as graftd uses it: an absolute path as is, a relative one joined to
/// graftd's own working directory (not the client's: the client may be on another machine). Errors about it
/// name the resolved absolute path and, for a relative path, the directory it was resolved against.
struct ClientPath {
    /// The request field it came in ("load_adapter.path").
    let field: String
    /// The path as the client sent it.
    let given: String
    /// The absolute path graftd reads or writes.
    let resolved: String
    /// graftd's working directory when ``given`` was relative, else nil.
    let base: String?

    /// `given` (from `field`) resolved against `workingDirectory`.
    init(_ given: String, field: String, workingDirectory: String = FileManager.default.currentDirectoryPath) {
        self.field = field
        self.given = given
        if given.hasPrefix("/") {
            resolved = URL(fileURLWithPath: given).standardizedFileURL.path
            base = nil
        } else {
            let directory = URL(fileURLWithPath: workingDirectory, isDirectory: true)
            resolved = URL(fileURLWithPath: given, relativeTo: directory).absoluteURL.standardizedFileURL.path
            base = workingDirectory
        }
    }

    /// How the path was resolved, for error messages.
    var explanation: String {
        guard let base else { return "\(field) \(resolved)" }
        return "\(field) '\(given)' resolved against graftd's working directory \(base) as \(resolved)"
    }

    /// Throws NOT_FOUND naming the resolved path (and the directory searched) when nothing exists there.
    func mustExist(_ what: String) throws {
        guard !FileManager.default.fileExists(atPath: resolved) else { return }
        throw GraftError(.notFound, "\(explanation): no such \(what)")
    }

    /// `error` with this path's resolution added when it is about a file (I/O, not found, format) and the
    /// client's path was relative; other errors unchanged.
    func annotate(_ error: Error) -> Error {
        guard base != nil, let e = error as? GraftError, [.io, .notFound, .format].contains(e.code) else { return error }
        return GraftError(e.code, "\(e.message) (\(explanation))")
    }

    /// Runs `body` with the resolved path, annotating what it throws (see ``annotate(_:)``).
    func use<T>(_ body: (String) throws -> T) throws -> T {
        do {
            return try body(resolved)
        } catch {
            throw annotate(error)
        }
    }
}

extension Engine {
    /// The non-empty path in `field` of a request, resolved against graftd's working directory.
    func clientPath(_ value: String, _ field: String) throws -> ClientPath {
        ClientPath(try nonEmpty(value, field), field: field)
    }
}
