import ArgumentParser
import CGraftSystem
import Foundation
import Graft
import GraftDaemon

/// `graftd`: the Graft daemon. Flags in, ``Daemon`` out.
struct GraftDaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "graftd",
        abstract: "Serve Graft over length-prefixed protobuf (proto/graft.proto) on a Unix socket and/or TCP.",
        discussion: """
            Clients send hello first (protocol version 1; on TCP with the token from --token-file).
            Relative paths in requests (models, data, adapters, checkpoints) resolve against graftd's working directory.
            SIGINT/SIGTERM cancel running training jobs, close connections and exit 0.
            """)

    @Option(help: "Unix socket path (mode 0600). Default: $XDG_RUNTIME_DIR/graftd.sock, else graftd.sock in the Graft cache directory.")
    var socket: String?

    @Flag(help: "Do not listen on a Unix socket (TCP only).")
    var noSocket = false

    @Option(help: "Listen on TCP at this port as well (0 = any free port, printed at start).")
    var port: Int?

    @Option(help: "TCP bind address.")
    var host = "127.0.0.1"

    @Flag(help: "Allow a TCP bind address other than loopback.")
    var allowRemote = false

    @Option(help: "File whose first line is the token clients must present in hello (required with --port).")
    var tokenFile: String?

    @Option(help: "Largest accepted frame in bytes.")
    var maxFrame = 64 << 20

    @Option(help: "Bytes queued for one client before the daemon stops reading from it.")
    var writeQueueLimit = 8 << 20

    @Option(help: ArgumentHelp("Seconds a client has to send the rest of a frame after its first byte, else it gets a PROTOCOL error and is closed (0 = no limit).", valueName: "seconds"))
    var frameTimeout: Double = 30

    @Option(help: ArgumentHelp("Seconds a new connection has to complete hello, else it gets a PROTOCOL error and is closed (0 = no limit).", valueName: "seconds"))
    var helloTimeout: Double = 10

    @Option(help: "Open connections at most; one beyond gets a STATE error frame and is closed.")
    var maxConnections = 256

    @Option(help: ArgumentHelp("The most positions (prompt + max_new_tokens) one generate request may use (default: each model's context length).", valueName: "tokens"))
    var contextLimit: Int?

    @Option(help: "The most sequences one batched decode step runs; further generate requests wait for a slot.")
    var maxBatchSequences = 32

    @Option(help: ArgumentHelp("MB of finished generations' KV caches kept per model, so prompts sharing a prefix under the same adapter skip recomputing it (0 = off).", valueName: "MB"))
    var promptCacheMb = 256

    @Option(help: "Worker threads for the engine's parallel kernels (default: $GRAFT_NUM_THREADS, else all cores).")
    var threads: Int?

    @Flag(help: "No per-request log lines on stderr.")
    var quiet = false

    func run() throws {
        cgraft_line_buffer_stdout()
        cgraft_tune_malloc()
        if let threads { Threading.setThreads(threads) }
        var config = DaemonConfiguration()
        config.socketPath = noSocket ? nil : (socket ?? DaemonConfiguration.defaultSocketPath)
        config.tcpPort = port
        config.tcpHost = host
        config.allowRemote = allowRemote
        config.maxFrame = maxFrame
        config.writeQueueLimit = writeQueueLimit
        config.frameTimeout = frameTimeout
        config.helloTimeout = helloTimeout
        config.maxConnections = maxConnections
        config.contextLimit = contextLimit
        config.maxBatchSequences = maxBatchSequences
        config.promptCacheBytes = promptCacheMb < 0 || promptCacheMb > (1 << 20) ? -1 : promptCacheMb << 20
        if quiet { config.log = nil }
        do {
            if let tokenFile { config.token = try DaemonConfiguration.readToken(path: tokenFile) }
            let daemon = try Daemon(configuration: config)
            try daemon.start()
            var where_: [String] = []
            if let path = config.socketPath { where_.append("unix:\(path)") }
            if let port = daemon.tcpPort { where_.append("tcp:\(config.tcpHost):\(port)") }
            print("graftd \(GraftVersion.string) listening on \(where_.joined(separator: " "))")
            daemon.run()
            print("graftd stopped")
        } catch let error as GraftError {
            FileHandle.standardError.write(Data("graftd: \(error.message)\n".utf8))
            throw ExitCode(1)
        }
    }
}

GraftDaemonCommand.main()
