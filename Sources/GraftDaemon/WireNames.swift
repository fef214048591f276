import Foundation
import Graft

/// The names the log uses for wire error codes, job states and request kinds.
extension Daemon {
    /// A wire error code's name in the log ("not_found").
    static func codeName(_ code: Graft_V1_Error.Code) -> String {
        // The GRAFT_STATUS_MAP row of the negated code, as in the header without its ERR_ prefix.
        if code == .unknown { return "unknown" }
        guard let status = GraftError.Code(rawValue: Int32(clamping: -code.rawValue)) else { return "code_\(code.rawValue)" }
        let name = status.name.lowercased()
        return name.hasPrefix("err_") ? String(name.dropFirst(4)) : name
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
        case .combineAdapters: return "combine_adapters"
        case .compressAdapter: return "compress_adapter"
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
