import CGraftUV
import Foundation

/// One client connection (loop thread only).
final class Connection {
    /// Its number in the log.
    let id: UInt64
    /// The libuv stream handle (a uv_pipe_t or uv_tcp_t), freed when closed.
    let handle: UnsafeMutableRawPointer
    /// The timer enforcing ``helloDeadline`` and ``frameDeadline``, initialized on accept and freed when closed.
    let timer: UnsafeMutablePointer<uv_timer_t>
    /// Whether it came in over TCP (hello then needs the token).
    let isTCP: Bool
    /// Incoming bytes split into frames.
    var decoder: FrameDecoder
    /// Hello received and accepted.
    var helloDone = false
    /// The client's self-description from hello.
    var clientName = ""
    /// Loop time (milliseconds, `uv_now`) by which hello must be done; nil once it is, or with no hello timeout.
    var helloDeadline: UInt64?
    /// Loop time (milliseconds) by which the frame whose first bytes have arrived must be complete; nil when no
    /// frame is partly received, or with no frame timeout.
    var frameDeadline: UInt64?
    /// Refused at the connection limit: its error frame is sent, what it sends is discarded until it closes or
    /// its linger time (``helloDeadline``) ends.
    var refused = false
    /// Bytes queued in libuv for writing.
    var pendingWriteBytes = 0
    /// Writes not yet completed.
    var pendingWrites = 0
    /// Each queued write's size, by request.
    var writeSizes: [UnsafeMutableRawPointer: Int] = [:]
    /// Reading is stopped because too much output is queued.
    var readPaused = false
    /// Close has begun; nothing more is read or written.
    var closing = false
    /// The daemon serving it.
    weak var daemon: Daemon?

    /// A connection over the accepted stream `handle`, decoding frames of at most `maxFrame` bytes.
    init(id: UInt64, handle: UnsafeMutableRawPointer, isTCP: Bool, maxFrame: Int) {
        self.id = id
        self.handle = handle
        self.isTCP = isTCP
        timer = .allocate(capacity: 1)
        decoder = FrameDecoder(maximumFrame: maxFrame)
    }

    /// The connection a libuv handle's `data` points to (not retained).
    static func from(_ data: UnsafeMutableRawPointer?) -> Connection? {
        data.map { Unmanaged<Connection>.fromOpaque($0).takeUnretainedValue() }
    }
}
