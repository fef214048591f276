import Foundation
import Graft
import GraftAssets

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
    /// Seconds a client has, from the first byte of a frame, to send the rest of it; then the daemon answers
    /// with a PROTOCOL error and closes the connection (a peer trickling a frame holds nothing for long). 0 = no
    /// limit. Time the daemon spends not reading (backpressure) does not count.
    public var frameTimeout: Double = 30
    /// Seconds a new connection has to complete hello; then it gets a PROTOCOL error and is closed. 0 = no limit.
    public var helloTimeout: Double = 10
    /// Open connections at most (those that have not said hello included). A connection beyond it gets a STATE
    /// error frame saying so and is closed.
    public var maxConnections = 256
    /// The most positions (prompt + `max_new_tokens`) one generate request may use; nil = each model's context
    /// length. Each running request's KV cache is allocated for exactly what it can use.
    public var contextLimit: Int?
    /// The most sequences one batched decode step runs; further generate requests wait for a slot.
    public var maxBatchSequences = 32
    /// Bytes of finished generations' KV caches kept per model for prompt caching (0 = none).
    public var promptCacheBytes = 256 << 20
    /// Where log lines go (one per request); nil = nowhere.
    public var log: (@Sendable (String) -> Void)? = { line in
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    /// A configuration listening on nothing yet; set ``socketPath`` and/or ``tcpPort``.
    public init() {}

    /// The longest ``frameTimeout`` or ``helloTimeout`` accepted, in seconds (one day).
    public static let maximumTimeout: Double = 86_400
    /// The largest ``maxConnections`` accepted.
    public static let maximumConnections = 1 << 20

    /// `$XDG_RUNTIME_DIR/graftd.sock`, else `graftd.sock` in the Graft cache directory.
    public static var defaultSocketPath: String {
        if let runtime = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !runtime.isEmpty {
            return runtime + "/graftd.sock"
        }
        return AssetCache.path("graftd.sock")
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
    /// without ``allowRemote``) or a limit is out of range (frame size, write queue, timeouts, connections).
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
        for (name, seconds) in [("frame timeout (--frame-timeout)", frameTimeout), ("hello timeout (--hello-timeout)", helloTimeout)] {
            guard seconds.isFinite, seconds >= 0, seconds <= Self.maximumTimeout else {
                throw GraftError.invalid("\(name) \(seconds) s is outside 0...\(Int(Self.maximumTimeout)) (0 = no limit)")
            }
        }
        if let contextLimit, !(1...(1 << 24)).contains(contextLimit) {
            throw GraftError.invalid("context limit (--context-limit) \(contextLimit) is outside 1...\(1 << 24)")
        }
        guard (1...4096).contains(maxBatchSequences) else {
            throw GraftError.invalid("max batch sequences (--max-batch-sequences) \(maxBatchSequences) is outside 1...4096")
        }
        guard promptCacheBytes >= 0 else {
            throw GraftError.invalid("prompt cache size (--prompt-cache-mb) must be ≥ 0, got \(promptCacheBytes) bytes")
        }
        guard (1...Self.maximumConnections).contains(maxConnections) else {
            throw GraftError.invalid("max connections (--max-connections) \(maxConnections) is outside 1...\(Self.maximumConnections)")
        }
    }

    /// The engine's generation batching settings.
    var generationSettings: GenerationSettings {
        var g = GenerationSettings()
        g.contextLimit = contextLimit
        g.maxBatchSequences = maxBatchSequences
        g.prefixCacheBytes = promptCacheBytes
        return g
    }
}
