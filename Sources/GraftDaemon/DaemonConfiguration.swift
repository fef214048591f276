import Foundation
import Graft

/// How a ``Daemon`` listens and what it accepts.
public struct DaemonConfiguration: Sendable {
    /// The Unix socket to listen on (mode 0600); nil = none.
    public var socketPath: String?
    /// The TCP address to listen on; only loopback addresses unless ``allowRemote``.
    public var tcpHost: String = "127.0.0.1"
    /// The TCP port (0 = any free port, see ``Daemon/tcpPort``); nil = no TCP listener.
    public var tcpPort: Int?
    /// Allows a TCP bind address other than loopback.
    public var allowRemote = false
    /// The token clients present in hello; required for TCP.
    public var token: String?
    /// The largest frame body accepted, in bytes.
    public var maxFrame = 64 << 20
    /// Bytes queued for a client beyond which the daemon stops reading its requests (and drops its progress
    /// events) until the client catches up.
    public var writeQueueLimit = 8 << 20
    /// Where log lines go (one per request); nil = nowhere.
    public var log: (@Sendable (String) -> Void)? = { line in
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    /// A configuration listening on nothing yet; set ``socketPath`` and/or ``tcpPort``.
    public init() {}

    /// `$XDG_RUNTIME_DIR/graftd.sock`, else `graftd.sock` in the Graft cache directory.
    public static var defaultSocketPath: String {
        if let runtime = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !runtime.isEmpty {
            return runtime + "/graftd.sock"
        }
        return GraftSession.assetPath("graftd.sock")
    }

    /// Reads the token from `path`: the file's first line, trimmed; it must not be empty.
    public static func readToken(path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw GraftError(.io, "\(path): cannot read the token file")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw GraftError.format("\(path): the token file is not UTF-8 text")
        }
        let token = text.split(whereSeparator: \.isNewline).first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        guard !token.isEmpty else { throw GraftError.format("\(path): the token file is empty") }
        return token
    }

    /// Throws when the settings contradict each other (no listener, TCP without a token, a remote bind address
    /// without ``allowRemote``, a frame limit out of range).
    public func validate() throws {
        guard socketPath != nil || tcpPort != nil else {
            throw GraftError.invalid("graftd needs a Unix socket path or a TCP port to listen on")
        }
        if let tcpPort {
            guard (0...65535).contains(tcpPort) else { throw GraftError.invalid("TCP port \(tcpPort) is outside 0...65535") }
            guard token != nil else {
                throw GraftError.invalid("TCP needs a token (--token-file): TCP clients must present it in hello")
            }
            let loopback = tcpHost == "127.0.0.1" || tcpHost == "::1" || tcpHost == "localhost" || tcpHost.hasPrefix("127.")
            guard loopback || allowRemote else {
                throw GraftError.invalid("TCP bind address \(tcpHost) is not loopback; pass --allow-remote to listen on it")
            }
        }
        guard maxFrame >= 1024, maxFrame <= Int(UInt32.max) else {
            throw GraftError.invalid("max frame \(maxFrame) bytes is outside 1024...\(UInt32.max)")
        }
        guard writeQueueLimit >= 4096 else { throw GraftError.invalid("write queue limit \(writeQueueLimit) is below 4096 bytes") }
    }
}
