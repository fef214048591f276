import Foundation
import Graft

/// Engine errors as wire errors.
extension Engine {
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
