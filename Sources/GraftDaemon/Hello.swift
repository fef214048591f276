import Foundation
import Graft

/// The hello exchange: protocol version and, on TCP (or when one is sent), the token, compared in constant time.
extension Daemon {

    /// Answers the connection's first request: accepted (protocol version matches, token right when needed) or
    /// a PROTOCOL / UNAUTHENTICATED error and the connection closed.
    func hello(_ hello: Graft_V1_Hello, _ connection: Connection, _ context: RequestContext) {
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
        endHelloDeadline(connection)
        connection.clientName = hello.clientName
        reply(context) {
            $0.hello = .with {
                $0.protocolVersion = Self.protocolVersion
                $0.serverVersion = GraftVersion.string
                $0.connectionID = connection.id
            }
        }
    }

    /// Whether `a` and `b` are equal, in time that depends on their lengths only.
    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        var diff = UInt8(x.count == y.count ? 0 : 1)
        for i in 0..<max(x.count, y.count) { diff |= (i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0) }
        return diff == 0
    }
}
