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
