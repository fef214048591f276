import CGraftUV
import Foundation
import Graft

/// What a peer may hold and for how long: the hello deadline, the deadline of a partly received frame, and the
/// connection limit. One libuv timer per connection, on the loop thread, fires at the nearer deadline.
extension Daemon {
    /// How long a refused connection may linger (its error frame read, what it sent discarded) before it is
    /// closed, in milliseconds.
    static let refusalLingerMilliseconds: UInt64 = 2000

    /// `seconds` as milliseconds, nil for 0 (no limit).
    static func milliseconds(_ seconds: Double) -> UInt64? {
        seconds > 0 ? UInt64((seconds * 1000).rounded(.up)) : nil
    }

    /// The loop's clock in milliseconds, brought up to date.
    func loopNow() -> UInt64 {
        uv_update_time(loop)
        return uv_now(loop)
    }

    /// Starts the hello deadline of a connection just accepted.
    func startHelloDeadline(_ connection: Connection) {
        if let ms = Self.milliseconds(configuration.helloTimeout) { connection.helloDeadline = loopNow() + ms }
        armTimer(connection)
    }

    /// Hello is done: its deadline no longer applies.
    func endHelloDeadline(_ connection: Connection) {
        connection.helloDeadline = nil
        armTimer(connection)
    }

    /// Updates the frame deadline after a read: it starts with the first byte of a frame, is dropped when a
    /// frame completes (`completedFrame`; the bytes still buffered then begin the next frame, which starts its
    /// own), and is gone when nothing is buffered.
    func frameProgress(_ connection: Connection, completedFrame: Bool) {
        guard !connection.closing else { return }
        let buffered = connection.decoder.bufferedBytes > 0
        if completedFrame || !buffered { connection.frameDeadline = nil }
        if buffered, connection.frameDeadline == nil, let ms = Self.milliseconds(configuration.frameTimeout) {
            connection.frameDeadline = loopNow() + ms
        }
        armTimer(connection)
    }

    /// Sets the connection's timer to the nearer of its deadlines (the frame deadline waits while the daemon is
    /// not reading from it), or stops it when none applies.
    func armTimer(_ connection: Connection) {
        guard !connection.closing else { return }
        let due = [connection.helloDeadline, connection.readPaused ? nil : connection.frameDeadline].compactMap { $0 }.min()
        guard let due else {
            uv_timer_stop(connection.timer)
            return
        }
        let now = uv_now(loop)
        uv_timer_start(connection.timer, { timer in
            guard let timer, let connection = Connection.from(timer.pointee.data) else { return }
            connection.daemon?.deadlinePassed(connection)
        }, due > now ? due - now : 0, 0)
    }

    /// The connection's timer fired: a refused connection's linger is over, or a peer that has not said hello
    /// or finished its frame in time gets a PROTOCOL error naming the limit and is closed.
    func deadlinePassed(_ connection: Connection) {
        guard !connection.closing else { return }
        let now = uv_now(loop)
        if connection.refused {
            close(connection, flush: false)
            return
        }
        if let due = connection.helloDeadline, now >= due {
            protocolError(connection, id: 0, code: .protocol,
                          "no hello within \(Self.seconds(configuration.helloTimeout)) s of connecting (--hello-timeout); closing")
            return
        }
        if !connection.readPaused, let due = connection.frameDeadline, now >= due {
            protocolError(connection, id: 0, code: .protocol,
                          "incomplete frame: \(connection.decoder.bufferedBytes) bytes received, the rest not within \(Self.seconds(configuration.frameTimeout)) s of its first byte (--frame-timeout); closing")
            return
        }
        armTimer(connection)
    }

    /// Refuses a connection beyond ``DaemonConfiguration/maxConnections``: sends a STATE error saying so, then
    /// discards what the peer sends (so it can read the error rather than meet a reset) until it closes or
    /// ``refusalLingerMilliseconds`` pass. Beyond as many lingering refusals again it is closed at once.
    func refuse(_ connection: Connection) {
        connection.refused = true
        let message = "graftd has \(connections.count) open connections, its limit (--max-connections \(configuration.maxConnections)); try again later"
        log("conn=\(connection.id) event=refused reason=max_connections open=\(connections.count)")
        stats.errors += 1
        var r = Graft_V1_Response()
        r.error = .with { $0.code = .state; $0.message = message }
        guard refusedConnections.count < configuration.maxConnections else {
            send(r, to: connection)
            close(connection, flush: true)
            return
        }
        refusedConnections[connection.id] = connection
        send(r, to: connection)
        guard !connection.closing else { return }
        connection.helloDeadline = loopNow() + Self.refusalLingerMilliseconds
        armTimer(connection)
        startReading(connection)
    }

    /// A number of seconds as written in logs and errors ("2", "0.5").
    static func seconds(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }
}
