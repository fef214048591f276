import Foundation
import Graft

/// The engine side of the daemon: models, adapters, forward passes, generation and training jobs. Every method
/// except the job registry runs on the engine worker thread.
final class Engine: @unchecked Sendable {
    /// The thread the engine runs on.
    let worker = EngineWorker()
    /// Training jobs (also read by the loop thread).
    let jobs = JobRegistry()
    /// Where responses and job events go (back to the loop thread).
    let emit: @Sendable (EngineOutput) -> Void
    /// The loaded models by id (worker thread only).
    var models: [String: GraftSession] = [:]
    /// Models loaded so far, for generated ids ("m1", "m2", ...).
    var modelCount = 0
    /// Guards ``_modelNames``.
    let namesLock = NSLock()
    /// The loaded models' ids as last published for the loop thread.
    var _modelNames: [String] = []
    /// Guards ``pendingForwards``, ``queued`` and ``forwardCounts`` (touched by both threads).
    let pendingLock = NSLock()
    /// Forward requests waiting for their model's queued batch, by model id.
    var pendingForwards: [String: [(Graft_V1_Forward, RequestContext)]] = [:]
    /// Requests queued (not yet started) per connection.
    var queued: [UInt64: Int] = [:]
    /// Forward requests answered, and the engine passes that answered them.
    var forwardCounts = (requests: UInt64(0), passes: UInt64(0))
    /// Generate requests per connection not yet answered (guarded by ``pendingLock``).
    var openGenerations: [UInt64: Int] = [:]
    /// Requests held behind a connection's running generations, in arrival order (guarded by ``pendingLock``).
    var held: [UInt64: [(Graft_V1_Request, RequestContext)]] = [:]
    /// Connections that closed while generating (guarded by ``pendingLock``).
    var closed: Set<UInt64> = []
    /// Batched generation's counters (guarded by ``pendingLock``).
    var generationCounts = GenerationStatistics()
    /// The generations in flight (worker thread only).
    let generation = GenerationState()
    /// How generate requests are batched and bounded.
    let settings: GenerationSettings

    /// Forward requests answered and the passes that answered them (thread-safe).
    var forwardStatistics: (requests: UInt64, passes: UInt64) {
        pendingLock.lock()
        defer { pendingLock.unlock() }
        return forwardCounts
    }

    /// An engine batching generation as `settings` say, whose outputs go to `emit` (called on the worker thread).
    init(settings: GenerationSettings = GenerationSettings(), emit: @escaping @Sendable (EngineOutput) -> Void) {
        self.settings = settings
        self.emit = emit
    }

    /// The loaded models' ids (thread-safe).
    var modelNames: [String] {
        namesLock.lock()
        defer { namesLock.unlock() }
        return _modelNames
    }

    /// Publishes the loaded models' ids for ``modelNames`` (after a load or unload).
    func publishModelNames() {
        namesLock.lock()
        _modelNames = models.keys.sorted()
        namesLock.unlock()
    }

    // MARK: dispatch

    /// Queues `request` for the worker; false when the worker no longer takes work.
    func submit(_ request: Graft_V1_Request, context: RequestContext) -> Bool {
        if holdIfGenerating(request, context: context) { return true }
        if case .generate(let r) = request.kind { return submitGenerate(r, context: context) }
        if case .forward(let r) = request.kind, r.adapterIds.isEmpty {
            return submitForward(r, context: context)
        }
        pendingLock.lock()
        queued[context.connection, default: 0] += 1
        pendingLock.unlock()
        let accepted = worker.submit(.init(startsJob: false) { [self] in
            dequeued(context.connection)
            do {
                try handle(request, context: context)
            } catch {
                emit(.reply(context, Self.errorResponse(id: context.id, error), final: true))
            }
        })
        if !accepted { dequeued(context.connection) }
        return accepted
    }

    /// Sends the response `fill` builds for `context`; `final` marks the request's last response.
    func reply(_ context: RequestContext, final: Bool = true, _ fill: (inout Graft_V1_Response) -> Void) {
        var r = Graft_V1_Response()
        r.id = context.id
        fill(&r)
        emit(.reply(context, r, final: final))
    }

    /// Answers `context` with `Ok`.
    func ok(_ context: RequestContext) {
        reply(context) { $0.ok = Graft_V1_Ok() }
    }

    /// Runs one request on the worker thread, answering through `emit`; throws what the client got wrong.
    func handle(_ request: Graft_V1_Request, context: RequestContext) throws {
        switch request.kind {
        case .addAdapter, .loadAdapter, .deleteAdapter, .combineAdapters, .compressAdapter, .startTraining, .unloadModel:
            invalidatePromptCaches()
        default:
            break
        }
        switch request.kind {
        case .loadModel(let r): try loadModel(r, context)
        case .unloadModel(let r): try unloadModel(r, context)
        case .modelInfo(let r): try modelInfo(r, context)
        case .addAdapter(let r): try addAdapter(r, context)
        case .loadAdapter(let r): try loadAdapter(r, context)
        case .saveAdapter(let r): try saveAdapter(r, context)
        case .listAdapters(let r): try listAdapters(r, context)
        case .deleteAdapter(let r): try deleteAdapter(r, context)
        case .setActiveAdapter(let r): try setActiveAdapter(r, context)
        case .combineAdapters(let r): try combineAdapters(r, context)
        case .compressAdapter(let r): try compressAdapter(r, context)
        case .forward(let r): runForwards(modelID: r.modelID, [(r, context)])
        case .generate: throw GraftError(.internalError, "generate requests are queued by submitGenerate")
        case .startTraining(let r): try startTraining(r, context)
        case .saveCheckpoint(let r): try saveCheckpoint(r, context)
        case .hello, .jobStatus, .cancelJob, .attachJob, .serverStats, .shutdown, .none:
            throw GraftError(.internalError, "request kind \(context.kind) is handled by the loop thread")
        }
    }
}
