import Foundation
import Graft
import GraftAssets

/// Training jobs: creating a job for a request and running it on the worker, streaming its progress events.
extension Engine {
    /// Creates a job training the request's adapter on its data, answers with the job's id, and queues the run.
    func startTraining(_ r: Graft_V1_StartTraining, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        let data = try trainingData(r.data, "start_training.data")
        let evalData = r.evalData.isEmpty ? nil : try trainingData(r.evalData, "start_training.eval_data")
        let training = try GraftTrainingSession(session: s, adapterName: r.adapter.isEmpty ? nil : r.adapter,
                                                options: try Self.trainingOptions(r.config))
        let job = jobs.create(modelID: r.modelID, adapter: training.trainer.adapter.name, training: training)
        emit(.jobStarted(context, job))
        worker.submit(.init(startsJob: true) { [self] in
            run(job, data: data, evalData: evalData, evalEvery: Int(r.evalEvery), progressEvery: max(1, Int(r.progressEvery)))
        })
    }

    /// Runs `job` to its end on the worker thread, emitting progress events every `progressEvery` steps (and
    /// after evaluations) and one final event saying how it ended; serves queued requests between steps.
    func run(_ job: TrainingJob, data: ClientPath?, evalData: ClientPath?, evalEvery: Int, progressEvery: Int) {
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
            let evalExamples = try evalData.map { path in try path.use { try training.loadExamples($0) } }
            func evaluate(into event: inout Graft_V1_TrainingEvent) throws {
                guard let evalExamples else { return }
                event.eval = Self.evalMetrics(try training.evaluate(evalExamples))
            }
            var stepError: Error?
            do {
                let examples = try data.map { try training.loadExamples($0.resolved) }
                    ?? training.tokenize(try AssetCache.tweets(for: training.session.task).train)
                try training.train(examples) { p in
                    var e = Self.trainingEvent(jobID: job.id, p)
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
            } catch {
                throw data?.annotate(error) ?? error
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

    /// Marks `job` ended in `state` and emits its final event.
    func finish(_ job: TrainingJob, _ event: inout Graft_V1_TrainingEvent, _ state: Graft_V1_JobState) {
        event.finished = state
        job.update(state: state, event: event)
        emit(.jobEvent(job, event))
    }

    /// Saves a job's trainer state (adapter, optimizer, schedule position) to a directory.
    func saveCheckpoint(_ r: Graft_V1_SaveCheckpoint, _ context: RequestContext) throws {
        guard let job = jobs.job(r.jobID) else { throw GraftError(.notFound, "no job '\(r.jobID)'") }
        guard let training = job.training else {
            throw GraftError(.state, "job \(job.id)'s model '\(job.modelID)' was unloaded; its trainer is gone")
        }
        try clientPath(r.path, "save_checkpoint.path").use { try training.trainer.saveCheckpoint(directory: $0) }
        ok(context)
    }

    /// Training data named in `field`: the demo set "tweets" (nil), or a JSONL file that must exist, relative
    /// paths resolved against graftd's working directory.
    func trainingData(_ value: String, _ field: String) throws -> ClientPath? {
        let name = try nonEmpty(value, field)
        if name == "tweets" { return nil }
        let path = ClientPath(name, field: field)
        try path.mustExist("JSONL file (nor is it \"tweets\", the demo set)")
        return path
    }
}
