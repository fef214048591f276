import Foundation
import Graft

/// A training job: its identity, state and latest progress, shared by the loop thread (status, cancel,
/// attach) and the engine worker (which runs it).
final class TrainingJob: @unchecked Sendable {
    /// The job's handle ("j1", "j2", ...).
    let id: String
    /// The model it trains.
    let modelID: String
    /// The adapter it trains.
    let adapter: String
    private let lock = NSLock()
    private var _state: Graft_V1_JobState = .jobQueued
    private var _last: Graft_V1_TrainingEvent?
    private var _cancelRequested = false
    /// The trainer (engine worker only); kept after the job ends for checkpoint saves.
    var training: GraftTrainingSession?
    /// The options it trains with (TrainingOptions.json), for JobStarted.
    let optionsJSON: String

    init(id: String, modelID: String, adapter: String, training: GraftTrainingSession) {
        self.id = id
        optionsJSON = training.options.json
        self.modelID = modelID
        self.adapter = adapter
        self.training = training
    }

    /// The current state.
    var state: Graft_V1_JobState {
        lock.lock()
        defer { lock.unlock() }
        return _state
    }

    /// The latest event sent (the final one once the job has ended).
    var lastEvent: Graft_V1_TrainingEvent? {
        lock.lock()
        defer { lock.unlock() }
        return _last
    }

    /// Whether the job has ended (completed, cancelled or failed).
    var isFinished: Bool {
        let s = state
        return s == .jobCompleted || s == .jobCancelled || s == .jobFailed
    }

    /// Whether a cancel was requested.
    var cancelRequested: Bool {
        lock.lock()
        defer { lock.unlock() }
        return _cancelRequested
    }

    /// Asks the job to stop after its current step; false when it has already ended.
    func requestCancel() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        switch _state {
        case .jobCompleted, .jobCancelled, .jobFailed: return false
        default:
            _cancelRequested = true
            return true
        }
    }

    /// Records a state change and the event that reports it.
    func update(state: Graft_V1_JobState? = nil, event: Graft_V1_TrainingEvent? = nil) {
        lock.lock()
        defer { lock.unlock() }
        if let state { _state = state }
        if let event { _last = event }
    }

    /// The job as a status message.
    func status() -> Graft_V1_JobStatus {
        var s = Graft_V1_JobStatus()
        s.jobID = id
        s.modelID = modelID
        s.adapter = adapter
        lock.lock()
        s.state = _state
        if let last = _last { s.last = last }
        lock.unlock()
        return s
    }
}

/// All jobs of the daemon's lifetime, by id (thread-safe).
final class JobRegistry: @unchecked Sendable {
    private let lock = NSLock()
    private var jobs: [String: TrainingJob] = [:]
    private var count = 0

    /// Registers a new job for `training`.
    func create(modelID: String, adapter: String, training: GraftTrainingSession) -> TrainingJob {
        lock.lock()
        defer { lock.unlock() }
        count += 1
        let job = TrainingJob(id: "j\(count)", modelID: modelID, adapter: adapter, training: training)
        jobs[job.id] = job
        return job
    }

    /// The job with `id`, if any.
    func job(_ id: String) -> TrainingJob? {
        lock.lock()
        defer { lock.unlock() }
        return jobs[id]
    }

    /// Every job.
    var all: [TrainingJob] {
        lock.lock()
        defer { lock.unlock() }
        return Array(jobs.values)
    }

    /// Jobs created so far.
    var total: Int {
        lock.lock()
        defer { lock.unlock() }
        return count
    }
}
