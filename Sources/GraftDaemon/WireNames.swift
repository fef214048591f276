import Foundation

/// The names the log uses for wire error codes, job states and request kinds.
extension Daemon {
    /// A wire error code's name in the log ("not_found").
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

    /// A job state's name in the log ("completed").
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

    /// A request kind's name in the log ("load_model"); "unknown" for none.
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
