import Foundation
import Graft

/// Where a request came from, carried along so its responses find their way back and its log line can be
/// written when the last response leaves.
struct RequestContext: Sendable {
    /// The connection's number.
    var connection: UInt64
    /// The client's request id.
    var id: UInt64
    /// The request kind, for the log.
    var kind: String
    /// When the frame was decoded (monotonic nanoseconds).
    var received: UInt64
}

/// What the engine sends back to the loop thread.
enum EngineOutput: Sendable {
    /// A response to `context`; `final` marks the last one (the request is then logged).
    case reply(RequestContext, Graft_V1_Response, final: Bool)
    /// A job was created for `context`: subscribe that connection to the job's events, then reply.
    case jobStarted(RequestContext, TrainingJob)
    /// A progress (or final) event of a job, for whichever connection is attached to it.
    case jobEvent(TrainingJob, Graft_V1_TrainingEvent)
    /// The daemon should shut down (a client asked).
    case shutdownRequested
}

/// The engine side of the daemon: models, adapters, forward passes, generation and training jobs. Every method
/// except the job registry runs on the engine worker thread.
final class Engine: @unchecked Sendable {
    /// The thread the engine runs on.
    let worker = EngineWorker()
    /// Training jobs (also read by the loop thread).
    let jobs = JobRegistry()
    private let emit: @Sendable (EngineOutput) -> Void
    private var models: [String: GraftSession] = [:]
    private var modelCount = 0
    private let namesLock = NSLock()
    private var _modelNames: [String] = []
    private let pendingLock = NSLock()
    /// Forward requests waiting for their model's queued batch, by model id.
    private var pendingForwards: [String: [(Graft_V1_Forward, RequestContext)]] = [:]
    /// Requests queued (not yet started) per connection.
    private var queued: [UInt64: Int] = [:]
    private var forwardCounts = (requests: UInt64(0), passes: UInt64(0))

    /// Forward requests answered and the passes that answered them (thread-safe).
    var forwardStatistics: (requests: UInt64, passes: UInt64) {
        pendingLock.lock()
        defer { pendingLock.unlock() }
        return forwardCounts
    }

    /// An engine whose outputs go to `emit` (called on the worker thread).
    init(emit: @escaping @Sendable (EngineOutput) -> Void) {
        self.emit = emit
    }

    /// The loaded models' ids (thread-safe).
    var modelNames: [String] {
        namesLock.lock()
        defer { namesLock.unlock() }
        return _modelNames
    }

    private func publishModelNames() {
        namesLock.lock()
        _modelNames = models.keys.sorted()
        namesLock.unlock()
    }

    // MARK: dispatch

    /// Queues `request` for the worker; false when the worker no longer takes work.
    func submit(_ request: Graft_V1_Request, context: RequestContext) -> Bool {
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

    private func reply(_ context: RequestContext, final: Bool = true, _ fill: (inout Graft_V1_Response) -> Void) {
        var r = Graft_V1_Response()
        r.id = context.id
        fill(&r)
        emit(.reply(context, r, final: final))
    }

    private func ok(_ context: RequestContext) {
        reply(context) { $0.ok = Graft_V1_Ok() }
    }

    private func handle(_ request: Graft_V1_Request, context: RequestContext) throws {
        switch request.kind {
        case .loadModel(let r): try loadModel(r, context)
        case .unloadModel(let r):
            let id = r.modelID
            _ = try session(id)
            if let job = jobs.all.first(where: { $0.modelID == id && !$0.isFinished }) {
                throw GraftError(.state, "model '\(id)' is being trained by job \(job.id); cancel it first")
            }
            for job in jobs.all where job.modelID == id { job.training = nil }
            models[id] = nil
            publishModelNames()
            ok(context)
        case .modelInfo(let r):
            let info = try session(r.modelID).infoJSON()
            reply(context) { $0.modelInfo = .with { $0.infoJson = info } }
        case .addAdapter(let r):
            try session(r.modelID).addAdapter(name: try nonEmpty(r.name, "add_adapter.name"), configJSON: r.configJson, seed: r.seed)
            ok(context)
        case .loadAdapter(let r):
            let name = r.name.isEmpty ? "default" : r.name
            try session(r.modelID).adapted.loadAdapter(directory: try nonEmpty(r.path, "load_adapter.path"), name: name)
            ok(context)
        case .saveAdapter(let r):
            try session(r.modelID).adapted.saveAdapter(try nonEmpty(r.name, "save_adapter.name"),
                                                       directory: try nonEmpty(r.path, "save_adapter.path"))
            ok(context)
        case .listAdapters(let r):
            let json = try session(r.modelID).adapterListJSON()
            reply(context) { $0.adapters = .with { $0.adaptersJson = json } }
        case .deleteAdapter(let r):
            try session(r.modelID).deleteAdapter(name: try nonEmpty(r.name, "delete_adapter.name"))
            ok(context)
        case .setActiveAdapter(let r):
            let s = try session(r.modelID)
            if r.name.isEmpty {
                s.adapted.setAdaptersDisabled(true)
            } else {
                try s.adapted.setActiveAdapter(r.name)
                s.adapted.setAdaptersDisabled(false)
            }
            ok(context)
        case .forward(let r): runForwards(modelID: r.modelID, [(r, context)])
        case .generate(let r): try generate(r, context)
        case .startTraining(let r): try startTraining(r, context)
        case .saveCheckpoint(let r):
            guard let job = jobs.job(r.jobID) else { throw GraftError(.notFound, "no job '\(r.jobID)'") }
            guard let training = job.training else {
                throw GraftError(.state, "job \(job.id)'s model '\(job.modelID)' was unloaded; its trainer is gone")
            }
            try training.trainer.saveCheckpoint(directory: try nonEmpty(r.path, "save_checkpoint.path"))
            ok(context)
        case .hello, .jobStatus, .cancelJob, .attachJob, .serverStats, .shutdown, .none:
            throw GraftError(.internalError, "request kind \(context.kind) is handled by the loop thread")
        }
    }

    // MARK: models

    private func session(_ id: String) throws -> GraftSession {
        guard let s = models[id] else {
            throw GraftError(.notFound, id.isEmpty ? "model_id is empty; load a model first (load_model)"
                : "no model '\(id)' (loaded: \(models.keys.sorted().joined(separator: ", ")))")
        }
        return s
    }

    private func nonEmpty(_ value: String, _ field: String) throws -> String {
        guard !value.isEmpty else { throw GraftError.invalid("\(field) is empty") }
        return value
    }

    private func loadModel(_ r: Graft_V1_LoadModel, _ context: RequestContext) throws {
        let path = GraftSession.resolveModelPath(try nonEmpty(r.path, "load_model.path"))
        let task: SessionTask
        switch r.task {
        case .base: task = .base
        case .sequenceClassification: task = .sequenceClassification
        case .causalLm: task = .causalLM
        case .UNRECOGNIZED(let v): throw GraftError.invalid("load_model.task \(v) is not a Task value (0, 1, 2)")
        }
        var id = r.modelID
        if id.isEmpty {
            repeat { modelCount += 1; id = "m\(modelCount)" } while models[id] != nil
        } else if models[id] != nil {
            throw GraftError(.state, "model_id '\(id)' is already loaded; unload it first or choose another")
        }
        let s = try GraftSession(path: path, task: task, numLabels: r.numLabels == 0 ? 2 : Int(r.numLabels), seed: r.seed)
        models[id] = s
        publishModelNames()
        let info = try s.infoJSON()
        reply(context) { $0.modelLoaded = .with { $0.modelID = id; $0.infoJson = info } }
    }

    // MARK: inference

    /// A forward request checked and tokenized, waiting to run alone or batched with others.
    private struct PreparedForward {
        var context: RequestContext
        var rows: [[Int32]]
        var output: SessionOutput
    }

    /// Forward requests of different connections for the same model that arrive while one is queued run
    /// together as one batch (up to these limits), each answered with its own rows.
    static let maxBatchedSequences = 64
    static let maxBatchedTokens = 32768

    /// Queues a forward request: it joins the model's pending batch when that cannot reorder its connection's
    /// requests (the connection has nothing else queued), else it is queued on its own.
    private func submitForward(_ r: Graft_V1_Forward, context: RequestContext) -> Bool {
        pendingLock.lock()
        let idle = queued[context.connection, default: 0] == 0
        queued[context.connection, default: 0] += 1
        if idle, pendingForwards[r.modelID] != nil {
            pendingForwards[r.modelID]?.append((r, context))
            pendingLock.unlock()
            return true
        }
        let startsBatch = pendingForwards[r.modelID] == nil
        if startsBatch { pendingForwards[r.modelID] = [(r, context)] }
        pendingLock.unlock()
        let accepted = worker.submit(.init(startsJob: false) { [self] in
            if startsBatch {
                pendingLock.lock()
                let batch = pendingForwards.removeValue(forKey: r.modelID) ?? []
                for (_, c) in batch { queued[c.connection, default: 1] -= 1 }
                pendingLock.unlock()
                runForwards(modelID: r.modelID, batch)
            } else {
                dequeued(context.connection)
                runForwards(modelID: r.modelID, [(r, context)])
            }
        })
        if !accepted { dequeued(context.connection) }
        return accepted
    }

    private func dequeued(_ connection: UInt64) {
        pendingLock.lock()
        queued[connection, default: 1] -= 1
        if queued[connection] == 0 { queued[connection] = nil }
        pendingLock.unlock()
    }

    private func prepareForward(_ r: Graft_V1_Forward, _ s: GraftSession, _ context: RequestContext) throws -> PreparedForward {
        guard r.sequences.isEmpty || r.texts.isEmpty else {
            throw GraftError.invalid("forward: give sequences or texts, not both")
        }
        let rows: [[Int32]] = r.texts.isEmpty ? r.sequences.map(\.ids) : r.texts.map { s.model.tokenizer.encode($0) }
        guard !rows.isEmpty else { throw GraftError.invalid("forward: no sequences and no texts") }
        if let empty = rows.firstIndex(where: \.isEmpty) {
            throw GraftError.invalid("forward: sequence \(empty) is empty")
        }
        _ = try tokenBatch(rows, s)  // validates ids and lengths against this model
        let output: SessionOutput
        switch r.output {
        case .default: output = (s.classifier != nil || s.model.llama != nil) ? .logits : .hidden
        case .hidden: output = .hidden
        case .logits: output = .logits
        case .UNRECOGNIZED(let v): throw GraftError.invalid("forward.output \(v) is not an Output value (0, 1, 2)")
        }
        if output == .logits && s.classifier == nil && s.model.llama == nil {
            throw GraftError(.unsupported, "forward: a bare encoder has no logits; ask for hidden states (OUTPUT_HIDDEN)")
        }
        return PreparedForward(context: context, rows: rows, output: output)
    }

    private func tokenBatch(_ rows: [[Int32]], _ s: GraftSession) throws -> TokenBatch {
        let stride = rows.map(\.count).max() ?? 1
        var ids = [Int32](repeating: 0, count: rows.count * stride)
        for (b, row) in rows.enumerated() { ids.replaceSubrange((b * stride)..<(b * stride + row.count), with: row) }
        return try s.tokenBatch(ids: ids, lengths: rows.map(\.count), batch: rows.count, stride: stride)
    }

    /// Runs forward requests for one model: per-row adapter ids alone, the rest batched by output kind.
    private func runForwards(modelID: String, _ requests: [(Graft_V1_Forward, RequestContext)]) {
        let s: GraftSession
        do {
            s = try session(modelID)
        } catch {
            for (_, c) in requests { emit(.reply(c, Self.errorResponse(id: c.id, error), final: true)) }
            return
        }
        var batchable: [PreparedForward] = []
        for (r, c) in requests {
            do {
                let p = try prepareForward(r, s, c)
                if r.adapterIds.isEmpty {
                    batchable.append(p)
                } else {
                    try answer([p], s, adapterIds: r.adapterIds)
                }
            } catch {
                emit(.reply(c, Self.errorResponse(id: c.id, error), final: true))
            }
        }
        for output in [SessionOutput.hidden, .logits] {
            var group = batchable.filter { $0.output == output }[...]
            while !group.isEmpty {
                var chunk: [PreparedForward] = []
                var sequences = 0, longest = 0
                while let next = group.first {
                    let n = next.rows.count, l = max(longest, next.rows.map(\.count).max() ?? 0)
                    if !chunk.isEmpty && (sequences + n > Self.maxBatchedSequences || (sequences + n) * l > Self.maxBatchedTokens) { break }
                    chunk.append(next)
                    sequences += n
                    longest = l
                    group = group.dropFirst()
                }
                do {
                    try answer(chunk, s, adapterIds: nil)
                } catch {
                    for p in chunk { emit(.reply(p.context, Self.errorResponse(id: p.context.id, error), final: true)) }
                }
            }
        }
    }

    /// One forward pass over the rows of `requests` (same output kind), each answered with its own rows cut to
    /// its own longest sequence.
    private func answer(_ requests: [PreparedForward], _ s: GraftSession, adapterIds: [Int32]?) throws {
        guard let output = requests.first?.output else { return }
        let rows = requests.flatMap(\.rows)
        let batch = try tokenBatch(rows, s)
        let values = try s.forward(batch: batch, adapterIds: adapterIds, output: output)
        pendingLock.lock()
        forwardCounts.requests += UInt64(requests.count)
        forwardCounts.passes += 1
        pendingLock.unlock()
        let stride = batch.length
        let perRow = output == .logits && s.classifier != nil
        let width = perRow ? values.count / max(1, rows.count) : values.count / max(1, rows.count * stride)
        var offset = 0
        for p in requests {
            let n = p.rows.count
            let own = p.rows.map(\.count).max() ?? 1
            var out: [Float]
            let shape: [UInt32]
            if perRow {
                out = Array(values[(offset * width)..<((offset + n) * width)])
                shape = [UInt32(n), UInt32(width)]
            } else {
                out = [Float](repeating: 0, count: n * own * width)
                values.withUnsafeBufferPointer { src in
                    out.withUnsafeMutableBufferPointer { dst in
                        for b in 0..<n {
                            guard let from = src.baseAddress?.advanced(by: (offset + b) * stride * width),
                                  let to = dst.baseAddress?.advanced(by: b * own * width) else { continue }
                            to.update(from: from, count: own * width)
                        }
                    }
                }
                shape = [UInt32(n), UInt32(own), UInt32(width)]
            }
            let lengths = p.rows.map { UInt32($0.count) }
            reply(p.context) {
                $0.forward = .with {
                    $0.shape = shape
                    $0.values = out
                    $0.lengths = lengths
                }
            }
            offset += n
        }
    }

    private func generate(_ r: Graft_V1_Generate, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        guard r.promptIds.isEmpty || r.prompt.isEmpty else {
            throw GraftError.invalid("generate: give prompt_ids or prompt, not both")
        }
        let prompt: [Int32]
        if r.promptIds.isEmpty {
            guard !r.prompt.isEmpty else { throw GraftError.invalid("generate: the prompt is empty") }
            prompt = s.model.encode(r.chat ? GraftSession.chatPrompt(r.prompt) : r.prompt)
        } else {
            prompt = r.promptIds
        }
        guard r.temperature >= 0, r.temperature.isFinite else {
            throw GraftError.invalid("generate.temperature must be ≥ 0, got \(r.temperature)")
        }
        guard r.topP >= 0, r.topP <= 1 else { throw GraftError.invalid("generate.top_p must be in (0, 1], got \(r.topP)") }
        guard r.maxNewTokens <= 1 << 20 else {
            throw GraftError.invalid("generate.max_new_tokens \(r.maxNewTokens) is above the limit of 1048576")
        }
        let params = GenerationParameters(maxNewTokens: r.maxNewTokens == 0 ? 128 : Int(r.maxNewTokens),
                                          temperature: r.temperature, topP: r.topP == 0 ? 1 : r.topP,
                                          topK: Int(r.topK), seed: r.seed)
        let ids = try s.generate(prompt: prompt, parameters: params, stopAtEOS: !r.ignoreEos) { id, piece in
            reply(context, final: false) { $0.token = .with { $0.tokenID = id; $0.text = piece } }
            return true
        }
        let text = s.model.decode(ids)
        reply(context) { $0.generated = .with { $0.ids = ids; $0.text = text } }
    }

    // MARK: training

    /// The wire's training config as the typed options (zero-valued fields take the defaults graft.proto states).
    static func trainingOptions(_ c: Graft_V1_TrainingConfig) throws -> TrainingOptions {
        var o = TrainingOptions()
        if c.learningRate != 0 { o.learningRate = c.learningRate }
        o.weightDecay = c.weightDecay
        o.warmupSteps = Int(c.warmupSteps)
        o.totalSteps = Int(c.totalSteps)
        switch c.schedule {
        case .linear: o.schedule = .linear
        case .constant: o.schedule = .constant
        case .cosine: o.schedule = .cosine
        case .UNRECOGNIZED(let v): throw GraftError.invalid("start_training.config.schedule \(v) is not a Schedule value (0, 1, 2)")
        }
        switch c.optimizer {
        case .adamw: o.optimizer = .adamw
        case .sgd: o.optimizer = .sgd
        case .UNRECOGNIZED(let v): throw GraftError.invalid("start_training.config.optimizer \(v) is not an Optimizer value (0, 1)")
        }
        guard !c.maxGradNorm.isNaN else { throw GraftError.invalid("start_training.config.max_grad_norm is NaN") }
        o.maxGradNorm = c.maxGradNorm == 0 ? 1 : max(0, c.maxGradNorm)
        if c.gradientAccumulationSteps != 0 { o.gradientAccumulationSteps = Int(c.gradientAccumulationSteps) }
        if c.batchSize != 0 { o.batchSize = Int(c.batchSize) }
        o.seed = c.seed
        if c.epochs != 0 { o.epochs = Int(c.epochs) }
        if c.maxLength != 0 { o.maxLength = Int(c.maxLength) }
        if !c.extrasJson.isEmpty {
            try o.update(json: c.extrasJson, allowed: TrainingOptions.extrasKeys, source: "start_training.config.extras_json")
        }
        do {
            try o.validate()
        } catch let e as GraftError {
            throw GraftError(e.code, "start_training.config.\(e.message)")
        }
        return o
    }

    private func startTraining(_ r: Graft_V1_StartTraining, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        let data = try nonEmpty(r.data, "start_training.data")
        let training = try GraftTrainingSession(session: s, adapterName: r.adapter.isEmpty ? nil : r.adapter,
                                                options: try Self.trainingOptions(r.config))
        let job = jobs.create(modelID: r.modelID, adapter: training.trainer.adapter.name, training: training)
        emit(.jobStarted(context, job))
        worker.submit(.init(startsJob: true) { [self] in
            run(job, data: data, evalData: r.evalData, evalEvery: Int(r.evalEvery), progressEvery: max(1, Int(r.progressEvery)))
        })
    }

    private func run(_ job: TrainingJob, data: String, evalData: String, evalEvery: Int, progressEvery: Int) {
        var last = Graft_V1_TrainingEvent()
        last.jobID = job.id
        guard let training = job.training else { return }
        defer { training.release() }
        if job.cancelRequested {
            finish(job, &last, .jobCancelled)
            return
        }
        job.update(state: .jobRunning)
        do {
            let evalExamples = evalData.isEmpty ? nil : try training.loadExamples(evalData)
            func evaluate(into event: inout Graft_V1_TrainingEvent) throws {
                guard let evalExamples else { return }
                let m = try training.evaluate(evalExamples)
                event.eval = .with {
                    $0.loss = m.loss
                    $0.accuracy = m.accuracy
                    $0.perplexity = m.perplexity
                    $0.count = UInt32(m.count)
                }
            }
            var stepError: Error?
            try training.train(file: data) { p in
                var e = Graft_V1_TrainingEvent()
                e.jobID = job.id
                e.step = UInt32(p.step)
                e.totalSteps = UInt32(p.totalSteps)
                e.epoch = UInt32(p.epoch)
                e.loss = p.loss
                e.meanLoss = p.meanLoss
                e.learningRate = p.learningRate
                e.gradNorm = p.gradNorm
                e.tokensPerSecond = p.tokensPerSecond
                e.elapsedSeconds = p.elapsed
                e.etaSeconds = p.eta
                do {
                    if evalEvery > 0, p.step % evalEvery == 0, p.step < p.totalSteps { try evaluate(into: &e) }
                } catch {
                    stepError = error
                    return false
                }
                last = e
                job.update(event: e)
                if p.step % progressEvery == 0 || p.step == p.totalSteps || e.hasEval { emit(.jobEvent(job, e)) }
                // Serve other clients between steps, then make sure this job's adapter is the trained one again.
                worker.runPending()
                do { try training.prepare() } catch {
                    stepError = error
                    return false
                }
                return !job.cancelRequested
            }
            if let stepError { throw stepError }
            last.clearEval()
            try evaluate(into: &last)
            finish(job, &last, .jobCompleted)
        } catch let e as GraftError where e.code == .cancelled && job.cancelRequested {
            finish(job, &last, .jobCancelled)
        } catch {
            last.error = Self.errorMessage(error)
            finish(job, &last, .jobFailed)
        }
    }

    private func finish(_ job: TrainingJob, _ event: inout Graft_V1_TrainingEvent, _ state: Graft_V1_JobState) {
        event.finished = state
        job.update(state: state, event: event)
        emit(.jobEvent(job, event))
    }

    // MARK: errors

    /// `error` as a typed wire error.
    static func errorMessage(_ error: Error) -> Graft_V1_Error {
        var e = Graft_V1_Error()
        guard let g = error as? GraftError else {
            e.code = .internal
            e.message = "\(error)"
            return e
        }
        e.message = g.message
        // graft.v1.Error.Code is the GRAFT_STATUS_MAP code negated.
        e.code = Graft_V1_Error.Code(rawValue: g.code.wireCode) ?? .internal
        return e
    }

    /// A response carrying `error` for request `id`.
    static func errorResponse(id: UInt64, _ error: Error) -> Graft_V1_Response {
        var r = Graft_V1_Response()
        r.id = id
        r.error = errorMessage(error)
        return r
    }
}
