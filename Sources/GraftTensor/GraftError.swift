import CGraftABI

/// The one error type every Graft module throws.
///
/// `code` says what kind of failure it is: a row of include/graft.h's `GRAFT_STATUS_MAP`, the one status table
/// behind the C ABI's codes, graftd's wire codes and the Python exceptions; `message` says what was wrong and
/// where: the file, field, value or shape at fault.
public struct GraftError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The kind of failure; raw values are the `GRAFT_STATUS_MAP` codes (checked against the header by a test).
    public enum Code: Int32, Sendable, CaseIterable {
        /// An argument, configuration value or shape is invalid.
        case invalidArgument = -1
        /// A file could not be read or written.
        case io = -2
        /// A file's contents are malformed.
        case format = -3
        /// The request is valid but not supported (yet).
        case unsupported = -4
        /// A named thing (file, module, adapter, key) does not exist.
        case notFound = -5
        /// An allocation failed.
        case outOfMemory = -6
        /// The call is not allowed in the object's current state.
        case state = -7
        /// The work was cancelled by a callback or a request.
        case cancelled = -8
        /// A bug in Graft: an invariant did not hold.
        case internalError = -9
        /// graftd: an undecodable frame, a frame above the maximum, a request before hello, a timed-out frame.
        case protocolError = -10
        /// graftd: a missing or wrong token.
        case unauthenticated = -11
        /// graftd: a request kind the daemon does not know.
        case unknownRequest = -12
        /// graftd: the daemon is shutting down.
        case shuttingDown = -13

        /// The status's macro name without `GRAFT_` (`ERR_INVALID_ARGUMENT`), from the header's table.
        public var name: String { cgraft_status_name(rawValue).map { String(cString: $0) } ?? "ERR_\(rawValue)" }
        /// The status's short description (`invalid argument`), as `graft_status_string` returns it.
        public var summary: String {
            cgraft_status_description(rawValue).map { String(cString: $0) } ?? "unknown status"
        }
        /// The code graftd sends for it: `graft.v1.Error.Code` is the status negated.
        public var wireCode: Int { Int(-rawValue) }
    }

    /// The kind of failure.
    public let code: Code
    /// A human-readable explanation naming what was wrong and where.
    public let message: String

    /// Creates an error of the given kind.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    /// Shorthand for `GraftError(.invalidArgument, message)`.
    public static func invalid(_ message: String) -> GraftError { GraftError(.invalidArgument, message) }
    /// Shorthand for `GraftError(.format, message)`.
    public static func format(_ message: String) -> GraftError { GraftError(.format, message) }
    /// Shorthand for `GraftError(.io, message)`.
    public static func io(_ message: String) -> GraftError { GraftError(.io, message) }
}
