import Foundation
import Testing

@testable import GraftDaemon

@Suite struct FrameDecoderTests {
    @Test func splitsFramesAcrossArbitraryChunkBoundaries() throws {
        let bodies: [[UInt8]] = [[], [1], Array(repeating: 7, count: 300), [9, 8, 7, 6]]
        let stream = bodies.flatMap { FrameDecoder.frame($0) }
        for chunk in [1, 3, 5, 4096] {
            var decoder = FrameDecoder(maximumFrame: 1024)
            var got: [[UInt8]] = []
            var i = 0
            while i < stream.count {
                let part = Array(stream[i..<min(stream.count, i + chunk)])
                part.withUnsafeBytes { decoder.append($0) }
                while let body = try decoder.next() { got.append(body) }
                i += chunk
            }
            #expect(got == bodies, "chunk size \(chunk)")
            #expect(decoder.bufferedBytes == 0)
        }
    }

    @Test func refusesALengthAboveTheMaximumFromTheHeaderAlone() {
        var decoder = FrameDecoder(maximumFrame: 1024)
        ([0x01, 0x04, 0x00, 0x00] as [UInt8]).withUnsafeBytes { decoder.append($0) }  // 1025, no body yet
        #expect(throws: FrameError.tooLarge(length: 1025, maximum: 1024)) { try decoder.next() }
    }

    @Test func waitsForATruncatedFrame() throws {
        var decoder = FrameDecoder(maximumFrame: 1024)
        let frame = FrameDecoder.frame([1, 2, 3, 4, 5])
        Array(frame.prefix(6)).withUnsafeBytes { decoder.append($0) }
        #expect(try decoder.next() == nil)
        Array(frame.dropFirst(6)).withUnsafeBytes { decoder.append($0) }
        #expect(try decoder.next() == [1, 2, 3, 4, 5])
    }
}

@Suite struct DaemonConfigurationTests {
    @Test func rejectsContradictorySettings() {
        var c = DaemonConfiguration()
        #expect(throws: (any Error).self) { try c.validate() }  // nothing to listen on
        c.tcpPort = 0
        #expect(throws: (any Error).self) { try c.validate() }  // TCP without a token
        c.token = "t"
        try? c.validate()
        c.tcpHost = "0.0.0.0"
        #expect(throws: (any Error).self) { try c.validate() }  // remote bind without --allow-remote
        c.allowRemote = true
        #expect((try? c.validate()) != nil)
        c.maxFrame = 10
        #expect(throws: (any Error).self) { try c.validate() }
    }

    @Test func readsTheTokenFilesFirstLine() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("graftd-token-\(getpid())").path
        defer { unlink(path) }
        try "  abc123  \nsecond line\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(try DaemonConfiguration.readToken(path: path) == "abc123")
        try "\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: (any Error).self) { try DaemonConfiguration.readToken(path: path) }
    }
}

/// A blocking test client over a connected socket.
private final class Peer {
    let fd: Int32
    var decoder = FrameDecoder(maximumFrame: 1 << 20)

    init(fd: Int32) { self.fd = fd }

    func sendBytes(_ bytes: [UInt8]) {
        #expect(bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) } == bytes.count)
    }

    func receive() throws -> Graft_V1_Response {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            if let body = try decoder.next() { return try Graft_V1_Response(serializedBytes: body) }
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { throw CocoaError(.fileReadUnknown) }
            buffer.withUnsafeBytes { decoder.append(UnsafeRawBufferPointer(rebasing: $0.prefix(n))) }
        }
    }

    func call(_ request: Graft_V1_Request) throws -> Graft_V1_Response {
        sendBytes(FrameDecoder.frame(try request.serializedBytes()))
        return try receive()
    }
}

/// The daemon in-process: hello, stats, errors, an unknown request and shutdown over a real Unix socket.
@Suite struct InProcessDaemonTests {
    @Test func servesHelloStatsAndUnknownRequestsThenShutsDown() throws {
        var config = DaemonConfiguration()
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("graftd-test-\(getpid()).sock").path
        config.socketPath = path
        config.log = nil
        let daemon = try Daemon(configuration: config)
        try daemon.start()
        let finished = DispatchSemaphore(value: 0)
        Thread { daemon.run(); finished.signal() }.start()

        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_mode & 0o777 == 0o600, "the socket is private to its owner")
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(rc == 0)
        let peer = Peer(fd: fd)

        let hello = try peer.call(.with { $0.id = 1; $0.hello = .with { $0.protocolVersion = 1 } })
        #expect(hello.id == 1 && hello.hello.protocolVersion == Daemon.protocolVersion)
        let stats = try peer.call(.with { $0.id = 2; $0.serverStats = .init() })
        #expect(stats.id == 2 && stats.serverStats.connections == 1 && stats.serverStats.requestsTotal == 2)
        let missing = try peer.call(.with { $0.id = 3; $0.modelInfo = .with { $0.modelID = "none" } })
        #expect(missing.id == 3 && missing.error.code == .notFound && missing.error.message.contains("none"))
        // A request kind from a newer protocol (field 99) is answered, and the connection stays usable.
        peer.sendBytes(FrameDecoder.frame([0x08, 4, 0x9A, 0x06, 1, 0x41]))
        let unknown = try peer.receive()
        #expect(unknown.id == 4 && unknown.error.code == .unknownRequest)
        #expect(try peer.call(.with { $0.id = 5; $0.serverStats = .init() }).serverStats.errorsTotal == 2)
        let bye = try peer.call(.with { $0.id = 6; $0.shutdown = .init() })
        #expect(bye.id == 6)
        #expect(finished.wait(timeout: .now() + 30) == .success, "the daemon stops after a shutdown request")
        #expect(access(path, F_OK) != 0, "the socket file is removed")
    }
}
