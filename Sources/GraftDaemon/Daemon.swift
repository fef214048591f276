import CGraftUV
import Foundation
import Graft
import SwiftProtobuf

/// graftd: serves the engine over length-prefixed protobuf frames (proto/graft.proto) on a Unix socket and/or
/// TCP, with a libuv loop.
///
/// The loop thread owns every socket; engine work runs on one worker thread (``EngineWorker``) and comes back
/// through `uv_async_send` and a mutex-guarded queue. Call ``start()`` (binds, throws on failure), then ``run()``
/// (blocks until shutdown: SIGINT/SIGTERM, a `shutdown` request, or ``requestShutdown()``).
public final class Daemon: @unchecked Sendable {
    /// The protocol version this daemon speaks.
    public static let protocolVersion: UInt32 = 1

    /// The settings.
    public let configuration: DaemonConfiguration
    /// The TCP port actually bound (after ``start()``), or nil.
    public internal(set) var tcpPort: Int?

    /// The libuv loop (run by ``run()`` on the calling thread, the loop thread).
    let loop: UnsafeMutablePointer<uv_loop_t>
    /// The Unix socket listener (a uv_pipe_t), until shutdown.
    var pipeListener: UnsafeMutableRawPointer?
    /// The TCP listener (a uv_tcp_t), until shutdown.
    var tcpListener: UnsafeMutableRawPointer?
    /// Wakes the loop when the engine has posted outputs (or a shutdown was asked).
    let async: UnsafeMutablePointer<uv_async_t>
    /// SIGINT and SIGTERM handlers, until shutdown.
    var signals: [UnsafeMutablePointer<uv_signal_t>] = []
    /// Models, adapters, forward passes, generation and training, on the worker thread.
    var engine: Engine!
    /// Open connections by number (refused ones excluded).
    var connections: [UInt64: Connection] = [:]
    /// Connections refused at the connection limit, lingering until their peers close or their time is up.
    var refusedConnections: [UInt64: Connection] = [:]
    /// The connection (and request id) each job's events go to, by job id.
    var subscribers: [String: (connection: UInt64, request: UInt64)] = [:]
    /// Guards ``outputs``, ``workerExited`` and ``shutdownAsked`` (written by other threads).
    let outputLock = NSLock()
    /// What the engine sent back, not yet delivered.
    var outputs: [EngineOutput] = []
    /// The worker thread has drained its queue and exited.
    var workerExited = false
    /// ``requestShutdown()`` was called.
    var shutdownAsked = false
    /// Shutdown has begun (listeners closed, jobs cancelled).
    var shuttingDown = false
    /// ``start()`` succeeded.
    var started = false
    /// The last connection number given.
    var nextConnection: UInt64 = 0
    /// When the daemon was created (monotonic nanoseconds).
    let startTime = uv_hrtime()
    /// Counters reported by server_stats.
    var stats = (connections: UInt64(0), requests: UInt64(0), errors: UInt64(0), bytesIn: UInt64(0), bytesOut: UInt64(0))
    /// Scratch space for reads: the loop is single-threaded and each read is consumed before the next.
    let readBuffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 16)

    /// A daemon with `configuration` (validated).
    public init(configuration: DaemonConfiguration) throws {
        try configuration.validate()
        self.configuration = configuration
        loop = .allocate(capacity: 1)
        async = .allocate(capacity: 1)
        let rc = uv_loop_init(loop)
        guard rc == 0 else {
            loop.deallocate()
            async.deallocate()
            throw GraftError(.internalError, "uv_loop_init: \(Self.uvError(rc))")
        }
        engine = Engine(settings: configuration.generationSettings) { [unowned self] output in self.post(output) }
    }

    deinit {
        uv_loop_close(loop)
        loop.deallocate()
        async.deallocate()
        readBuffer.deallocate()
    }

    /// A libuv error code as its message and name.
    static func uvError(_ code: Int32) -> String {
        String(cString: uv_strerror(code)) + " (" + String(cString: uv_err_name(code)) + ")"
    }

    /// This daemon as a libuv handle's `data` (not retained: the daemon outlives its loop).
    var unmanaged: UnsafeMutableRawPointer { Unmanaged.passUnretained(self).toOpaque() }

    /// The daemon a libuv handle's `data` points to.
    static func daemon(_ data: UnsafeMutableRawPointer?) -> Daemon? {
        data.map { Unmanaged<Daemon>.fromOpaque($0).takeUnretainedValue() }
    }

    // MARK: start / run / stop

    /// Binds the listeners and starts the engine worker. Throws naming the address at fault.
    public func start() throws {
        guard !started else { return }
        cgraft_ignore_sigpipe()
        uv_async_init(loop, async) { handle in
            Daemon.daemon(handle?.pointee.data)?.drainOutputs()
        }
        async.pointee.data = unmanaged
        do {
            if let path = configuration.socketPath { try listenUnix(path) }
            if let port = configuration.tcpPort { try listenTCP(host: configuration.tcpHost, port: port) }
        } catch {
            closeListeners()
            uv_close(cgraft_uv_handle(async), nil)
            uv_run(loop, UV_RUN_DEFAULT)
            throw error
        }
        for signal in [SIGINT, SIGTERM] {
            let handle = UnsafeMutablePointer<uv_signal_t>.allocate(capacity: 1)
            uv_signal_init(loop, handle)
            handle.pointee.data = unmanaged
            uv_signal_start(handle, { handle, _ in Daemon.daemon(handle?.pointee.data)?.beginShutdown() }, signal)
            signals.append(handle)
        }
        engine.worker.start { [unowned self] in
            outputLock.lock()
            workerExited = true
            outputLock.unlock()
            uv_async_send(async)
        }
        started = true
    }

    /// Runs the loop until the daemon has shut down (all jobs cancelled or finished, all connections closed).
    public func run() {
        guard started else { return }
        uv_run(loop, UV_RUN_DEFAULT)
        if let path = configuration.socketPath { unlink(path) }
    }

    /// Asks the daemon to shut down gracefully (thread-safe).
    public func requestShutdown() {
        outputLock.lock()
        shutdownAsked = true
        outputLock.unlock()
        uv_async_send(async)
    }

    /// Closes the listeners and signal handlers, asks every job to cancel and lets the worker drain; the loop
    /// ends in ``finishShutdown()`` once the worker has exited.
    func beginShutdown() {
        guard !shuttingDown else { return }
        shuttingDown = true
        log("event=shutdown connections=\(connections.count) jobs_running=\(engine.jobs.all.filter { !$0.isFinished }.count)")
        closeListeners()
        for s in signals {
            uv_close(cgraft_uv_handle(s)) { h in h.map { UnsafeMutableRawPointer($0).deallocate() } }
        }
        signals.removeAll()
        for job in engine.jobs.all { _ = job.requestCancel() }
        engine.worker.stop()
    }

    /// Closes whichever listeners are open.
    func closeListeners() {
        for listener in [pipeListener, tcpListener].compactMap({ $0 }) {
            uv_close(cgraft_uv_handle(listener)) { h in h.map { UnsafeMutableRawPointer($0).deallocate() } }
        }
        pipeListener = nil
        tcpListener = nil
    }

    /// Closes every connection (after its queued responses) and the async handle, so the loop can end.
    func finishShutdown() {
        for connection in Array(connections.values) { close(connection, flush: true) }
        for connection in Array(refusedConnections.values) { close(connection, flush: false) }
        uv_close(cgraft_uv_handle(async), nil)
    }

    // MARK: engine outputs

    /// Queues an engine output for the loop thread (any thread).
    func post(_ output: EngineOutput) {
        outputLock.lock()
        outputs.append(output)
        outputLock.unlock()
        uv_async_send(async)
    }

    /// Delivers the engine's outputs on the loop thread, and begins or finishes shutdown when due.
    func drainOutputs() {
        outputLock.lock()
        let batch = outputs
        outputs.removeAll(keepingCapacity: true)
        let exited = workerExited
        let asked = shutdownAsked
        outputLock.unlock()
        for output in batch {
            switch output {
            case let .reply(context, response, final):
                deliver(context, response, final: final)
            case let .jobStarted(context, job):
                subscribers[job.id] = (context.connection, context.id)
                reply(context) { $0.jobStarted = .with { $0.jobID = job.id; $0.running = true; $0.optionsJson = job.optionsJSON } }
            case let .jobEvent(job, event):
                deliver(job, event)
            case .shutdownRequested:
                beginShutdown()
            }
        }
        if asked { beginShutdown() }
        if exited && shuttingDown {
            outputLock.lock()
            workerExited = false
            outputLock.unlock()
            finishShutdown()
        }
    }

    // MARK: names and logging

    /// Writes one log line, prefixed with the wall-clock time, to the configured sink.
    func log(_ line: String) {
        guard let sink = configuration.log else { return }
        let t = Date().timeIntervalSince1970
        sink("ts=\(String(format: "%.6f", t)) \(line)")
    }
}
