/// The one error type every Graft module throws.
///
/// `code` says what kind of failure it is (and maps one to one onto the C ABI's status codes);
/// `message` says what was wrong and where: the file, field, value or shape at fault.
public struct GraftError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The kind of failure.
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
