import CGraftUV
import Foundation
import Graft

/// The listeners: the Unix socket (created 0600, a stale socket file replaced, a live one refused) and TCP, and
/// accepting their connections.
extension Daemon {

    private static let handleSize = max(MemoryLayout<uv_pipe_t>.size, MemoryLayout<uv_tcp_t>.size)

    /// Binds and listens on the Unix socket at `path` (mode 0600); throws naming the path at fault.
    func listenUnix(_ path: String) throws {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw GraftError(.io, "\(path): exists and is not a socket; refusing to replace it")
            }
            if Self.socketAcceptsConnections(path) {
                throw GraftError(.state, "\(path): another daemon is listening on this socket")
            }
            unlink(path)
        }
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        let handle = UnsafeMutableRawPointer.allocate(byteCount: Self.handleSize, alignment: 16)
        uv_pipe_init(loop, handle.assumingMemoryBound(to: uv_pipe_t.self), 0)
        cgraft_uv_handle(handle).pointee.data = unmanaged
        pipeListener = handle
        // The socket is created 0600: no other user may even connect while permissions are being set.
        let oldMask = umask(0o177)
        let rc = uv_pipe_bind(handle.assumingMemoryBound(to: uv_pipe_t.self), path)
        umask(oldMask)
        guard rc == 0 else { throw GraftError(.io, "\(path): cannot bind the Unix socket: \(Self.uvError(rc))") }
        chmod(path, 0o600)
        let lrc = uv_listen(cgraft_uv_stream(handle), 128) { server, status in
            Daemon.daemon(server?.pointee.data)?.accept(server, status: status, tcp: false)
        }
        guard lrc == 0 else { throw GraftError(.io, "\(path): cannot listen: \(Self.uvError(lrc))") }
        log("event=listen unix=\(path)")
    }

    /// Whether something accepts connections on the Unix socket at `path` (another daemon).
    static func socketAcceptsConnections(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
    }

    /// Binds and listens on TCP `host`:`port` and records the bound port; throws naming the address at fault.
    func listenTCP(host: String, port: Int) throws {
        var storage = sockaddr_storage()
        let rc: Int32 = withUnsafeMutablePointer(to: &storage) { p in
            let name = host == "localhost" ? "127.0.0.1" : host
            if name.contains(":") {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { uv_ip6_addr(name, Int32(port), $0) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { uv_ip4_addr(name, Int32(port), $0) }
        }
        guard rc == 0 else { throw GraftError.invalid("TCP bind address '\(host)' is not an IPv4 or IPv6 address") }
        let handle = UnsafeMutableRawPointer.allocate(byteCount: Self.handleSize, alignment: 16)
        uv_tcp_init(loop, handle.assumingMemoryBound(to: uv_tcp_t.self))
        cgraft_uv_handle(handle).pointee.data = unmanaged
        tcpListener = handle
        let brc = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_bind(handle.assumingMemoryBound(to: uv_tcp_t.self), $0, 0) }
        }
        guard brc == 0 else { throw GraftError(.io, "\(host):\(port): cannot bind TCP: \(Self.uvError(brc))") }
        let lrc = uv_listen(cgraft_uv_stream(handle), 128) { server, status in
            Daemon.daemon(server?.pointee.data)?.accept(server, status: status, tcp: true)
        }
        guard lrc == 0 else { throw GraftError(.io, "\(host):\(port): cannot listen: \(Self.uvError(lrc))") }
        var bound = sockaddr_storage()
        var length = Int32(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                _ = uv_tcp_getsockname(handle.assumingMemoryBound(to: uv_tcp_t.self), $0, &length)
            }
        }
        let boundPort: UInt16 = withUnsafePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        tcpPort = Int(boundPort)
        log("event=listen tcp=\(host):\(boundPort)")
    }

    /// Accepts a connection from `server`: it is served, or refused when ``DaemonConfiguration/maxConnections``
    /// are open.
    func accept(_ server: UnsafeMutablePointer<uv_stream_t>?, status: Int32, tcp: Bool) {
        guard status == 0, let server, !shuttingDown else { return }
        let handle = UnsafeMutableRawPointer.allocate(byteCount: Self.handleSize, alignment: 16)
        if tcp {
            uv_tcp_init(loop, handle.assumingMemoryBound(to: uv_tcp_t.self))
        } else {
            uv_pipe_init(loop, handle.assumingMemoryBound(to: uv_pipe_t.self), 0)
        }
        guard uv_accept(server, cgraft_uv_stream(handle)) == 0 else {
            uv_close(cgraft_uv_handle(handle)) { h in h.map { UnsafeMutableRawPointer($0).deallocate() } }
            return
        }
        if tcp { uv_tcp_nodelay(handle.assumingMemoryBound(to: uv_tcp_t.self), 1) }
        nextConnection += 1
        let connection = Connection(id: nextConnection, handle: handle, isTCP: tcp, maxFrame: configuration.maxFrame)
        connection.daemon = self
        cgraft_uv_handle(handle).pointee.data = Unmanaged.passRetained(connection).toOpaque()
        uv_timer_init(loop, connection.timer)
        connection.timer.pointee.data = Unmanaged.passUnretained(connection).toOpaque()
        guard connections.count < configuration.maxConnections else {
            refuse(connection)
            return
        }
        stats.connections += 1
        connections[connection.id] = connection
        startHelloDeadline(connection)
        startReading(connection)
    }
}
