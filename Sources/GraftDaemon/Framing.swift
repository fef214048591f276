import Foundation

/// What was wrong with a stream of frames.
public enum FrameError: Error, Equatable, CustomStringConvertible {
    /// A frame announced more bytes than the configured maximum.
    case tooLarge(length: UInt32, maximum: Int)

    /// A one-line description for logs and error responses.
    public var description: String {
        switch self {
        case let .tooLarge(length, maximum):
            return "frame of \(length) bytes exceeds the maximum of \(maximum) bytes (--max-frame)"
        }
    }
}

/// Splits a byte stream into frames: a 4-byte little-endian unsigned length, then that many bytes.
///
/// The announced length is checked against `maximumFrame` as soon as its four bytes arrive, before the body is
/// buffered, so a hostile length never makes the daemon allocate. Bytes of an incomplete frame are kept until
/// the rest arrives.
public struct FrameDecoder: Sendable {
    /// The largest body accepted, in bytes.
    public let maximumFrame: Int
    private var buffer: [UInt8] = []
    private var start = 0

    /// A decoder accepting bodies of at most `maximumFrame` bytes.
    public init(maximumFrame: Int) {
        self.maximumFrame = maximumFrame
    }

    /// Bytes received but not yet returned as a frame.
    public var bufferedBytes: Int { buffer.count - start }

    /// Appends received bytes.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        if start > 0 && start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        } else if start > 65536 && start * 2 > buffer.count {
            buffer.removeFirst(start)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame's body, nil when more bytes are needed; throws when the next frame is too large
    /// (the stream cannot be trusted after that: close it).
    public mutating func next() throws(FrameError) -> [UInt8]? {
        guard buffer.count - start >= 4 else { return nil }
        let length = UInt32(buffer[start]) | UInt32(buffer[start + 1]) << 8
            | UInt32(buffer[start + 2]) << 16 | UInt32(buffer[start + 3]) << 24
        guard Int(length) <= maximumFrame else { throw .tooLarge(length: length, maximum: maximumFrame) }
        guard buffer.count - start - 4 >= Int(length) else { return nil }
        let body = Array(buffer[(start + 4)..<(start + 4 + Int(length))])
        start += 4 + Int(length)
        return body
    }

    /// `body` with its 4-byte little-endian length prefix.
    public static func frame(_ body: [UInt8]) -> [UInt8] {
        let n = UInt32(truncatingIfNeeded: body.count)
        var out = [UInt8]()
        out.reserveCapacity(body.count + 4)
        out.append(UInt8(n & 0xff))
        out.append(UInt8((n >> 8) & 0xff))
        out.append(UInt8((n >> 16) & 0xff))
        out.append(UInt8(n >> 24))
        out.append(contentsOf: body)
        return out
    }
}
