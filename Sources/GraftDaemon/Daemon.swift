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
    public private(set) var tcpPort: Int?

    private let loop: UnsafeMutablePointer<uv_loop_t>
    private var pipeListener: UnsafeMutableRawPointer?
    private var tcpListener: UnsafeMutableRawPointer?
    private let async: UnsafeMutablePointer<uv_async_t>
    private var signals: [UnsafeMutablePointer<uv_signal_t>] = []
    private var engine: Engine!
    private var connections: [UInt64: Connection] = [:]
    private var subscribers: [String: (connection: UInt64, request: UInt64)] = [:]
    private let outputLock = NSLock()
    private var outputs: [EngineOutput] = []
    private var workerExited = false
    private var shutdownAsked = false
    private var shuttingDown = false
    private var started = false
    private var nextConnection: UInt64 = 0
    private let startTime = uv_hrtime()
    private var stats = (connections: UInt64(0), requests: UInt64(0), errors: UInt64(0), bytesIn: UInt64(0), bytesOut: UInt64(0))
    /// Scratch space for reads: the loop is single-threaded and each read is consumed before the next.
    private let readBuffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 16)

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
        engine = Engine { [unowned self] output in self.post(output) }
    }

    deinit {
        uv_loop_close(loop)
        loop.deallocate()
        async.deallocate()
        readBuffer.deallocate()
    }

    static func uvError(_ code: Int32) -> String {
        String(cString: uv_strerror(code)) + " (" + String(cString: uv_err_name(code)) + ")"
    }

    private var unmanaged: UnsafeMutableRawPointer { Unmanaged.passUnretained(self).toOpaque() }

    private static func daemon(_ data: UnsafeMutableRawPointer?) -> Daemon? {
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

    private func beginShutdown() {
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

    private func closeListeners() {
        for listener in [pipeListener, tcpListener].compactMap({ $0 }) {
            uv_close(cgraft_uv_handle(listener)) { h in h.map { UnsafeMutableRawPointer($0).deallocate() } }
        }
        pipeListener = nil
        tcpListener = nil
    }

    private func finishShutdown() {
        for connection in Array(connections.values) { close(connection, flush: true) }
        uv_close(cgraft_uv_handle(async), nil)
    }

    // MARK: listeners

    private static let handleSize = max(MemoryLayout<uv_pipe_t>.size, MemoryLayout<uv_tcp_t>.size)

    private func listenUnix(_ path: String) throws {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw GraftError(.io, "\(path): exists and is not a socket; refusing to replace it")
            }
            if Self.socketAcceptsConnections(path) {
                throw GraftError(.state, "\(path): another daemon is listening on this socket")
            }
            unlink(path)
        }
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        let handle = UnsafeMutableRawPointer.allocate(byteCount: Self.handleSize, alignment: 16)
        uv_pipe_init(loop, handle.assumingMemoryBound(to: uv_pipe_t.self), 0)
        cgraft_uv_handle(handle).pointee.data = unmanaged
        pipeListener = handle
        // The socket is created 0600: no other user may even connect while permissions are being set.
        let oldMask = umask(0o177)
        let rc = uv_pipe_bind(handle.assumingMemoryBound(to: uv_pipe_t.self), path)
        umask(oldMask)
        guard rc == 0 else { throw GraftError(.io, "\(path): cannot bind the Unix socket: \(Self.uvError(rc))") }
        chmod(path, 0o600)
        let lrc = uv_listen(cgraft_uv_stream(handle), 128) { server, status in
            Daemon.daemon(server?.pointee.data)?.accept(server, status: status, tcp: false)
        }
        guard lrc == 0 else { throw GraftError(.io, "\(path): cannot listen: \(Self.uvError(lrc))") }
        log("event=listen unix=\(path)")
    }

    private static func socketAcceptsConnections(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
    }

    private func listenTCP(host: String, port: Int) throws {
        var storage = sockaddr_storage()
        let rc: Int32 = withUnsafeMutablePointer(to: &storage) { p in
            let name = host == "localhost" ? "127.0.0.1" : host
            if name.contains(":") {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { uv_ip6_addr(name, Int32(port), $0) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { uv_ip4_addr(name, Int32(port), $0) }
        }
        guard rc == 0 else { throw GraftError.invalid("TCP bind address '\(host)' is not an IPv4 or IPv6 address") }
        let handle = UnsafeMutableRawPointer.allocate(byteCount: Self.handleSize, alignment: 16)
        uv_tcp_init(loop, handle.assumingMemoryBound(to: uv_tcp_t.self))
        cgraft_uv_handle(handle).pointee.data = unmanaged
        tcpListener = handle
        let brc = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_bind(handle.assumingMemoryBound(to: uv_tcp_t.self), $0, 0) }
        }
        guard brc == 0 else { throw GraftError(.io, "\(host):\(port): cannot bind TCP: \(Self.uvError(brc))") }
        let lrc = uv_listen(cgraft_uv_stream(handle), 128) { server, status in
            Daemon.daemon(server?.pointee.data)?.accept(server, status: status, tcp: true)
        }
        guard lrc == 0 else { throw GraftError(.io, "\(host):\(port): cannot listen: \(Self.uvError(lrc))") }
        var bound = sockaddr_storage()
        var length = Int32(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                _ = uv_tcp_getsockname(handle.assumingMemoryBound(to: uv_tcp_t.self), $0, &length)
            }
        }
        let boundPort: UInt16 = withUnsafePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        tcpPort = Int(boundPort)
        log("event=listen tcp=\(host):\(boundPort)")
    }

    private func accept(_ server: UnsafeMutablePointer<uv_stream_t>?, status: Int32, tcp: Bool) {
        guard status == 0, let server, !shuttingDown else { return }
        let handle = UnsafeMutableRawPointer.allocate(byteCount: Self.handleSize, alignment: 16)
        if tcp {
            uv_tcp_init(loop, handle.assumingMemoryBound(to: uv_tcp_t.self))
        } else {
            uv_pipe_init(loop, handle.assumingMemoryBound(to: uv_pipe_t.self), 0)
        }
        guard uv_accept(server, cgraft_uv_stream(handle)) == 0 else {
            uv_close(cgraft_uv_handle(handle)) { h in h.map { UnsafeMutableRawPointer($0).deallocate() } }
            return
        }
        if tcp { uv_tcp_nodelay(handle.assumingMemoryBound(to: uv_tcp_t.self), 1) }
        nextConnection += 1
        stats.connections += 1
        let connection = Connection(id: nextConnection, handle: handle, isTCP: tcp, maxFrame: configuration.maxFrame)
        connections[connection.id] = connection
        connection.daemon = self
        cgraft_uv_handle(handle).pointee.data = Unmanaged.passRetained(connection).toOpaque()
        startReading(connection)
    }

    // MARK: reading

    private func startReading(_ connection: Connection) {
        connection.readPaused = false
        uv_read_start(cgraft_uv_stream(connection.handle), { handle, _, buf in
            guard let handle, let buf, let d = Connection.from(handle.pointee.data)?.daemon else { return }
            buf.pointee = uv_buf_init(d.readBuffer.assumingMemoryBound(to: CChar.self), 1 << 16)
        }, { stream, nread, _ in
            guard let stream, let connection = Connection.from(stream.pointee.data) else { return }
            connection.daemon?.didRead(connection, nread)
        })
    }

    private func didRead(_ connection: Connection, _ nread: Int) {
        guard nread >= 0 else {
            close(connection, flush: false)
            return
        }
        guard nread > 0, !connection.closing else { return }
        stats.bytesIn += UInt64(nread)
        connection.decoder.append(UnsafeRawBufferPointer(start: readBuffer, count: nread))
        do {
            while !connection.closing, let body = try connection.decoder.next() {
                handleFrame(body, connection)
            }
        } catch {
            protocolError(connection, id: 0, code: .protocol, "\(error)")
        }
    }

    private func protocolError(_ connection: Connection, id: UInt64, code: Graft_V1_Error.Code, _ message: String) {
        var r = Graft_V1_Response()
        r.id = id
        r.error = .with { $0.code = code; $0.message = message }
        stats.errors += 1
        send(r, to: connection)
        log("conn=\(connection.id) id=\(id) kind=frame status=\(Self.codeName(code)) error=\"\(message)\" action=close")
        close(connection, flush: true)
    }

    private func handleFrame(_ body: [UInt8], _ connection: Connection) {
        let received = uv_hrtime()
        stats.requests += 1
        let request: Graft_V1_Request
        do {
            request = try Graft_V1_Request(serializedBytes: body)
        } catch {
            protocolError(connection, id: 0, code: .protocol, "undecodable frame of \(body.count) bytes: not a graft.v1.Request (\(error))")
            return
        }
        let context = RequestContext(connection: connection.id, id: request.id, kind: Self.kindName(request.kind), received: received)
        guard connection.helloDone else {
            guard case .hello(let hello) = request.kind else {
                protocolError(connection, id: request.id, code: .protocol, "the first request must be hello (got \(context.kind))")
                return
            }
            self.hello(hello, connection, context)
            return
        }
        if shuttingDown, request.kind != nil {
            errorReply(context, .shuttingDown, "the daemon is shutting down")
            return
        }
        switch request.kind {
        case .none:
            errorReply(context, .unknownRequest, "request \(request.id) has no kind this daemon knows (protocol version \(Self.protocolVersion)); unknown fields: \(request.unknownFields.data.count) bytes")
        case .hello:
            errorReply(context, .protocol, "hello was already received on this connection")
        case .jobStatus(let r):
            guard let job = engine.jobs.job(r.jobID) else { return errorReply(context, .notFound, "no job '\(r.jobID)'") }
            reply(context) { $0.jobStatus = job.status() }
        case .cancelJob(let r):
            guard let job = engine.jobs.job(r.jobID) else { return errorReply(context, .notFound, "no job '\(r.jobID)'") }
            guard job.requestCancel() else { return errorReply(context, .state, "job \(job.id) has already finished") }
            reply(context) { $0.ok = Graft_V1_Ok() }
        case .attachJob(let r):
            guard let job = engine.jobs.job(r.jobID) else { return errorReply(context, .notFound, "no job '\(r.jobID)'") }
            subscribers[job.id] = (connection.id, request.id)
            let finished = job.isFinished
            reply(context) { $0.jobStarted = .with { $0.jobID = job.id; $0.running = !finished } }
            if finished, let last = job.lastEvent { deliver(job, last) }
        case .serverStats:
            let s = serverStats()
            reply(context) { $0.serverStats = s }
        case .shutdown:
            reply(context) { $0.ok = Graft_V1_Ok() }
            beginShutdown()
        default:
            if !engine.submit(request, context: context) {
                errorReply(context, .shuttingDown, "the daemon is shutting down")
            }
        }
    }

    private func hello(_ hello: Graft_V1_Hello, _ connection: Connection, _ context: RequestContext) {
        guard hello.protocolVersion == Self.protocolVersion else {
            protocolError(connection, id: context.id, code: .protocol,
                          "protocol version \(hello.protocolVersion) is not supported; this daemon speaks \(Self.protocolVersion)")
            return
        }
        if connection.isTCP || !hello.token.isEmpty {
            guard let token = configuration.token, Self.constantTimeEqual(token, hello.token) else {
                let why = hello.token.isEmpty ? "hello carries no token; TCP clients must present the daemon's token"
                    : "hello carries a wrong token"
                protocolError(connection, id: context.id, code: .unauthenticated, why)
                return
            }
        }
        connection.helloDone = true
        connection.clientName = hello.clientName
        reply(context) {
            $0.hello = .with {
                $0.protocolVersion = Self.protocolVersion
                $0.serverVersion = GraftVersion.string
                $0.connectionID = connection.id
            }
        }
    }

    private static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        var diff = UInt8(x.count == y.count ? 0 : 1)
        for i in 0..<max(x.count, y.count) { diff |= (i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0) }
        return diff == 0
    }

    private func serverStats() -> Graft_V1_ServerStats {
        var s = Graft_V1_ServerStats()
        s.uptimeSeconds = Double(uv_hrtime() - startTime) / 1e9
        s.connections = UInt32(connections.count)
        s.connectionsTotal = stats.connections
        s.requestsTotal = stats.requests
        s.errorsTotal = stats.errors
        s.bytesIn = stats.bytesIn
        s.bytesOut = stats.bytesOut
        s.models = engine.modelNames
        let jobs = engine.jobs.all
        s.jobsRunning = UInt32(jobs.filter { !$0.isFinished }.count)
        s.jobsTotal = UInt32(engine.jobs.total)
        s.queueDepth = UInt32(engine.worker.queueDepth)
        let forwards = engine.forwardStatistics
        s.forwardRequests = forwards.requests
        s.forwardPasses = forwards.passes
        return s
    }

    // MARK: replies

    private func reply(_ context: RequestContext, _ fill: (inout Graft_V1_Response) -> Void) {
        var r = Graft_V1_Response()
        r.id = context.id
        fill(&r)
        deliver(context, r, final: true)
    }

    private func errorReply(_ context: RequestContext, _ code: Graft_V1_Error.Code, _ message: String) {
        reply(context) { $0.error = .with { $0.code = code; $0.message = message } }
    }

    private func deliver(_ context: RequestContext, _ response: Graft_V1_Response, final: Bool) {
        if let connection = connections[context.connection] { send(response, to: connection) }
        guard final else { return }
        var status = "ok"
        if case .error(let e) = response.kind {
            status = Self.codeName(e.code)
            stats.errors += 1
        }
        let micros = Double(uv_hrtime() - context.received) / 1e3
        log("conn=\(context.connection) id=\(context.id) kind=\(context.kind) status=\(status) duration_us=\(String(format: "%.0f", micros))")
    }

    private func deliver(_ job: TrainingJob, _ event: Graft_V1_TrainingEvent) {
        guard let sub = subscribers[job.id], let connection = connections[sub.connection] else { return }
        let isFinal = event.finished != .jobUnspecified
        // A client that does not read loses progress events (it can poll job_status), never the final one.
        if !isFinal && connection.pendingWriteBytes > configuration.writeQueueLimit { return }
        var r = Graft_V1_Response()
        r.id = sub.request
        r.event = event
        send(r, to: connection)
        if isFinal {
            log("conn=\(connection.id) job=\(job.id) event=finished state=\(Self.stateName(event.finished))")
        }
    }

    private func send(_ response: Graft_V1_Response, to connection: Connection) {
        guard !connection.closing else { return }
        let body: [UInt8]
        do {
            body = try response.serializedBytes()
        } catch {
            log("conn=\(connection.id) id=\(response.id) error=\"cannot encode the response: \(error)\"")
            return
        }
        let frame = FrameDecoder.frame(body)
        stats.bytesOut += UInt64(frame.count)
        let stream = cgraft_uv_stream(connection.handle)
        var offset = 0
        // Fast path: write directly when nothing is queued and the socket takes it.
        if connection.pendingWriteBytes == 0 {
            let written = frame.withUnsafeBytes { raw -> Int32 in
                var buf = uv_buf_init(UnsafeMutablePointer(mutating: raw.baseAddress?.assumingMemoryBound(to: CChar.self)), UInt32(raw.count))
                return uv_try_write(stream, &buf, 1)
            }
            if written == Int32(frame.count) { return }
            if written > 0 {
                offset = Int(written)
            } else if written != UV_EAGAIN.rawValue {
                close(connection, flush: false)
                return
            }
        }
        let count = frame.count - offset
        let storage = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 1)
        frame.withUnsafeBytes { raw in
            if let base = raw.baseAddress { storage.copyMemory(from: base + offset, byteCount: count) }
        }
        let request = UnsafeMutablePointer<uv_write_t>.allocate(capacity: 1)
        request.pointee.data = storage
        var buf = uv_buf_init(storage.assumingMemoryBound(to: CChar.self), UInt32(count))
        connection.pendingWriteBytes += count
        connection.pendingWrites += 1
        let rc = uv_write(request, stream, &buf, 1) { request, status in
            guard let request else { return }
            let bytes = request.pointee.data
            if let connection = Connection.from(request.pointee.handle?.pointee.data) {
                connection.daemon?.didWrite(connection, request: request, status: status)
            }
            bytes?.deallocate()
            request.deallocate()
        }
        if rc != 0 {
            connection.pendingWriteBytes -= count
            connection.pendingWrites -= 1
            storage.deallocate()
            request.deallocate()
            close(connection, flush: false)
            return
        }
        connection.writeSizes[UnsafeMutableRawPointer(request)] = count
        if !connection.readPaused && connection.pendingWriteBytes > configuration.writeQueueLimit {
            uv_read_stop(stream)
            connection.readPaused = true
            log("conn=\(connection.id) event=backpressure queued_bytes=\(connection.pendingWriteBytes) action=pause_reading")
        }
    }

    private func didWrite(_ connection: Connection, request: UnsafeMutablePointer<uv_write_t>, status: Int32) {
        let size = connection.writeSizes.removeValue(forKey: UnsafeMutableRawPointer(request)) ?? 0
        connection.pendingWriteBytes -= size
        connection.pendingWrites -= 1
        if status < 0 && status != UV_ECANCELED.rawValue {
            close(connection, flush: false)
            return
        }
        if connection.readPaused && !connection.closing && connection.pendingWriteBytes <= configuration.writeQueueLimit / 2 {
            startReading(connection)
        }
    }

    // MARK: connections

    private func close(_ connection: Connection, flush: Bool) {
        guard !connection.closing else { return }
        connection.closing = true
        connections[connection.id] = nil
        for (job, sub) in subscribers where sub.connection == connection.id { subscribers[job] = nil }
        let stream = cgraft_uv_stream(connection.handle)
        uv_read_stop(stream)
        let closeHandle: (UnsafeMutableRawPointer) -> Void = { handle in
            uv_close(cgraft_uv_handle(handle)) { h in
                guard let h else { return }
                if let data = h.pointee.data { Unmanaged<Connection>.fromOpaque(data).release() }
                UnsafeMutableRawPointer(h).deallocate()
            }
        }
        if flush && connection.pendingWrites > 0 {
            // Let queued responses (e.g. the error that explains the close) reach the client first.
            let request = UnsafeMutablePointer<uv_shutdown_t>.allocate(capacity: 1)
            if uv_shutdown(request, stream, { request, _ in
                guard let request else { return }
                if let handle = request.pointee.handle {
                    uv_close(cgraft_uv_handle(handle)) { h in
                        guard let h else { return }
                        if let data = h.pointee.data { Unmanaged<Connection>.fromOpaque(data).release() }
                        UnsafeMutableRawPointer(h).deallocate()
                    }
                }
                request.deallocate()
            }) != 0 {
                request.deallocate()
                closeHandle(connection.handle)
            }
        } else {
            closeHandle(connection.handle)
        }
        log("conn=\(connection.id) event=close")
    }

    // MARK: engine outputs

    private func post(_ output: EngineOutput) {
        outputLock.lock()
        outputs.append(output)
        outputLock.unlock()
        uv_async_send(async)
    }

    private func drainOutputs() {
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
                reply(context) { $0.jobStarted = .with { $0.jobID = job.id; $0.running = true } }
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

    private func log(_ line: String) {
        guard let sink = configuration.log else { return }
        let t = Date().timeIntervalSince1970
        sink("ts=\(String(format: "%.6f", t)) \(line)")
    }

    static func codeName(_ code: Graft_V1_Error.Code) -> String {
        switch code {
        case .unknown: return "unknown"
        case .invalidArgument: return "invalid_argument"
        case .io: return "io"
        case .format: return "format"
        case .unsupported: return "unsupported"
        case .notFound: return "not_found"
        case .outOfMemory: return "out_of_memory"
        case .state: return "state"
        case .cancelled: return "cancelled"
        case .internal: return "internal"
        case .protocol: return "protocol"
        case .unauthenticated: return "unauthenticated"
        case .unknownRequest: return "unknown_request"
        case .shuttingDown: return "shutting_down"
        case .UNRECOGNIZED(let v): return "code_\(v)"
        }
    }

    static func stateName(_ state: Graft_V1_JobState) -> String {
        switch state {
        case .jobUnspecified: return "unspecified"
        case .jobQueued: return "queued"
        case .jobRunning: return "running"
        case .jobCompleted: return "completed"
        case .jobCancelled: return "cancelled"
        case .jobFailed: return "failed"
        case .UNRECOGNIZED(let v): return "state_\(v)"
        }
    }

    static func kindName(_ kind: Graft_V1_Request.OneOf_Kind?) -> String {
        guard let kind else { return "unknown" }
        switch kind {
        case .hello: return "hello"
        case .loadModel: return "load_model"
        case .unloadModel: return "unload_model"
        case .modelInfo: return "model_info"
        case .addAdapter: return "add_adapter"
        case .loadAdapter: return "load_adapter"
        case .saveAdapter: return "save_adapter"
        case .listAdapters: return "list_adapters"
        case .deleteAdapter: return "delete_adapter"
        case .setActiveAdapter: return "set_active_adapter"
        case .forward: return "forward"
        case .generate: return "generate"
        case .startTraining: return "start_training"
        case .jobStatus: return "job_status"
        case .cancelJob: return "cancel_job"
        case .attachJob: return "attach_job"
        case .saveCheckpoint: return "save_checkpoint"
        case .serverStats: return "server_stats"
        case .shutdown: return "shutdown"
        }
    }
}

/// One client connection (loop thread only).
final class Connection {
    /// Its number in the log.
    let id: UInt64
    /// The libuv stream handle (a uv_pipe_t or uv_tcp_t), freed when closed.
    let handle: UnsafeMutableRawPointer
    /// Whether it came in over TCP (hello then needs the token).
    let isTCP: Bool
    /// Incoming bytes split into frames.
    var decoder: FrameDecoder
    /// Hello received and accepted.
    var helloDone = false
    /// The client's self-description from hello.
    var clientName = ""
    /// Bytes queued in libuv for writing.
    var pendingWriteBytes = 0
    /// Writes not yet completed.
    var pendingWrites = 0
    /// Each queued write's size, by request.
    var writeSizes: [UnsafeMutableRawPointer: Int] = [:]
    /// Reading is stopped because too much output is queued.
    var readPaused = false
    /// Close has begun; nothing more is read or written.
    var closing = false
    /// The daemon serving it.
    weak var daemon: Daemon?

    init(id: UInt64, handle: UnsafeMutableRawPointer, isTCP: Bool, maxFrame: Int) {
        self.id = id
        self.handle = handle
        self.isTCP = isTCP
        decoder = FrameDecoder(maximumFrame: maxFrame)
    }

    static func from(_ data: UnsafeMutableRawPointer?) -> Connection? {
        data.map { Unmanaged<Connection>.fromOpaque($0).takeUnretainedValue() }
    }
}
