import CGraftUV
import Foundation
import Graft
import SwiftProtobuf

/// Requests answered on the loop thread (frame decoding, job status/cancel/attach, server stats, shutdown) and
/// the replies that carry every response back to its connection; everything else goes to the ``Engine``.
extension Daemon {
    /// Answers with a connection-level error (`id` 0 when the request could not be read), logs it and closes
    /// the connection once the error is written.
    func protocolError(_ connection: Connection, id: UInt64, code: Graft_V1_Error.Code, _ message: String) {
        var r = Graft_V1_Response()
        r.id = id
        r.error = .with { $0.code = code; $0.message = message }
        stats.errors += 1
        send(r, to: connection)
        log("conn=\(connection.id) id=\(id) kind=frame status=\(Self.codeName(code)) error=\"\(message)\" action=close")
        close(connection, flush: true)
    }

    /// Decodes one frame and answers it: hello first, then the loop-side requests here, the rest through the
    /// engine.
    func handleFrame(_ body: [UInt8], _ connection: Connection) {
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
            reply(context) { $0.jobStarted = .with { $0.jobID = job.id; $0.running = !finished; $0.optionsJson = job.optionsJSON } }
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

    /// The counters, models, jobs and queue depth server_stats reports.
    func serverStats() -> Graft_V1_ServerStats {
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
        let generation = engine.generationStatistics
        s.generateRequests = generation.requests
        s.generateSteps = generation.steps
        s.generatedTokens = generation.tokens
        s.generating = UInt32(clamping: generation.generating)
        s.kvCacheBytes = UInt64(generation.kvCacheBytes)
        s.prefixCacheBytes = UInt64(generation.prefixCacheBytes)
        s.prefixCacheHits = generation.prefixCacheHits
        s.prefixCacheTokens = generation.prefixCacheTokens
        s.contextLimit = UInt32(clamping: configuration.contextLimit ?? 0)
        return s
    }

    // MARK: replies

    /// Sends the final response `fill` builds for `context`.
    func reply(_ context: RequestContext, _ fill: (inout Graft_V1_Response) -> Void) {
        var r = Graft_V1_Response()
        r.id = context.id
        fill(&r)
        deliver(context, r, final: true)
    }

    /// Sends an error as the final response for `context`.
    func errorReply(_ context: RequestContext, _ code: Graft_V1_Error.Code, _ message: String) {
        reply(context) { $0.error = .with { $0.code = code; $0.message = message } }
    }

    /// Sends a response to its connection, if still open; the final one is logged with its status and duration.
    func deliver(_ context: RequestContext, _ response: Graft_V1_Response, final: Bool) {
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

    /// Sends a job's event to the connection attached to it; progress events are dropped while that connection
    /// is over its write queue limit, the final one never.
    func deliver(_ job: TrainingJob, _ event: Graft_V1_TrainingEvent) {
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
}
