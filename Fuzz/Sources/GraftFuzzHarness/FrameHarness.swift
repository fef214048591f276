import GraftDaemon
import SwiftProtobuf

extension FuzzHarness {
    /// Feeds the input to the daemon's frame decoder in chunks whose sizes come from the input itself, and
    /// decodes every complete frame as a `graft.v1.Request`, as graftd does with bytes read from a socket.
    ///
    /// The first byte picks the chunking; the rest is the stream. The frame limit is 64 KiB so a hostile
    /// length prefix is rejected as graftd rejects one above `--max-frame`.
    public static func frame(_ data: UnsafeRawBufferPointer) {
        guard let first = data.first else { return }
        let stream = UnsafeRawBufferPointer(rebasing: data[1...])
        var decoder = FrameDecoder(maximumFrame: 1 << 16)
        let chunk = Int(first) + 1
        var offset = 0
        while offset < stream.count {
            let n = min(chunk, stream.count - offset)
            decoder.append(UnsafeRawBufferPointer(rebasing: stream[offset..<(offset + n)]))
            offset += n
            do {
                while let body = try decoder.next() {
                    guard body.count <= decoder.maximumFrame else { fatalError("frame: body of \(body.count) bytes passed the limit") }
                    if let request = try? Graft_V1_Request(serializedBytes: body) {
                        // What graftd does with a decoded request before dispatching it.
                        _ = request.id
                        _ = request.kind
                        _ = try? request.serializedBytes() as [UInt8]
                        _ = try? request.jsonString()
                    }
                }
            } catch {
                guard !error.description.isEmpty else { fatalError("frame: empty FrameError description") }
                return  // graftd closes the connection
            }
        }
        guard decoder.bufferedBytes <= stream.count else { fatalError("frame: buffered more bytes than received") }
    }
}
