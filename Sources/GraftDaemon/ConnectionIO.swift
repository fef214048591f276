import CGraftUV
import Foundation
import Graft

/// Connection I/O on the loop thread: reading into the frame decoder, writing responses (directly when the
/// socket takes them, else queued), backpressure (reads paused while too much output is queued) and closing.
extension Daemon {
    /// Starts (or resumes) reading `connection` into the shared read buffer.
    func startReading(_ connection: Connection) {
        connection.readPaused = false
        uv_read_start(cgraft_uv_stream(connection.handle), { handle, _, buf in
            guard let handle, let buf, let d = Connection.from(handle.pointee.data)?.daemon else { return }
            buf.pointee = uv_buf_init(d.readBuffer.assumingMemoryBound(to: CChar.self), 1 << 16)
        }, { stream, nread, _ in
            guard let stream, let connection = Connection.from(stream.pointee.data) else { return }
            connection.daemon?.didRead(connection, nread)
        })
    }

    /// Handles `nread` bytes read into the read buffer (negative: end of stream or an error): every complete
    /// frame is handled in order, a partial one starts or keeps its frame deadline.
    func didRead(_ connection: Connection, _ nread: Int) {
        guard nread >= 0 else {
            close(connection, flush: false)
            return
        }
        guard nread > 0, !connection.closing else { return }
        stats.bytesIn += UInt64(nread)
        if connection.refused { return }  // its error is sent; what it says now is discarded
        connection.decoder.append(UnsafeRawBufferPointer(start: readBuffer, count: nread))
        var completed = false
        do {
            while !connection.closing, let body = try connection.decoder.next() {
                completed = true
                handleFrame(body, connection)
            }
        } catch {
            protocolError(connection, id: 0, code: .protocol, "\(error)")
        }
        frameProgress(connection, completedFrame: completed)
    }

    /// Writes `response` as one frame: at once when nothing is queued and the socket takes it, else queued;
    /// pauses reading from `connection` once more than the write queue limit is queued for it.
    func send(_ response: Graft_V1_Response, to connection: Connection) {
        guard !connection.closing else { return }
        let body: [UInt8]
        do {
            body = try response.serializedBytes()
        } catch {
            log("conn=\(connection.id) id=\(response.id) error=\"cannot encode the response: \(error)\"")
            return
        }
        let frame = FrameDecoder.frame(body)
        stats.bytesOut += UInt64(frame.count)
        let stream = cgraft_uv_stream(connection.handle)
        var offset = 0
        // Fast path: write directly when nothing is queued and the socket takes it.
        if connection.pendingWriteBytes == 0 {
            let written = frame.withUnsafeBytes { raw -> Int32 in
                var buf = uv_buf_init(UnsafeMutablePointer(mutating: raw.baseAddress?.assumingMemoryBound(to: CChar.self)), UInt32(raw.count))
                return uv_try_write(stream, &buf, 1)
            }
            if written == Int32(frame.count) { return }
            if written > 0 {
                offset = Int(written)
            } else if written != UV_EAGAIN.rawValue {
                close(connection, flush: false)
                return
            }
        }
        let count = frame.count - offset
        let storage = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 1)
        frame.withUnsafeBytes { raw in
            if let base = raw.baseAddress { storage.copyMemory(from: base + offset, byteCount: count) }
        }
        let request = UnsafeMutablePointer<uv_write_t>.allocate(capacity: 1)
        request.pointee.data = storage
        var buf = uv_buf_init(storage.assumingMemoryBound(to: CChar.self), UInt32(count))
        connection.pendingWriteBytes += count
        connection.pendingWrites += 1
        let rc = uv_write(request, stream, &buf, 1) { request, status in
            guard let request else { return }
            let bytes = request.pointee.data
            if let connection = Connection.from(request.pointee.handle?.pointee.data) {
                connection.daemon?.didWrite(connection, request: request, status: status)
            }
            bytes?.deallocate()
            request.deallocate()
        }
        if rc != 0 {
            connection.pendingWriteBytes -= count
            connection.pendingWrites -= 1
            storage.deallocate()
            request.deallocate()
            close(connection, flush: false)
            return
        }
        connection.writeSizes[UnsafeMutableRawPointer(request)] = count
        if !connection.readPaused && connection.pendingWriteBytes > configuration.writeQueueLimit {
            uv_read_stop(stream)
            connection.readPaused = true
            armTimer(connection)  // time spent not reading is not the client's: its frame deadline waits
            log("conn=\(connection.id) event=backpressure queued_bytes=\(connection.pendingWriteBytes) action=pause_reading")
        }
    }

    /// A queued write finished: unqueue its bytes and resume reading once the queue has drained to half the
    /// limit (a partial frame then gets a fresh deadline).
    func didWrite(_ connection: Connection, request: UnsafeMutablePointer<uv_write_t>, status: Int32) {
        let size = connection.writeSizes.removeValue(forKey: UnsafeMutableRawPointer(request)) ?? 0
        connection.pendingWriteBytes -= size
        connection.pendingWrites -= 1
        if status < 0 && status != UV_ECANCELED.rawValue {
            close(connection, flush: false)
            return
        }
        if connection.readPaused && !connection.closing && connection.pendingWriteBytes <= configuration.writeQueueLimit / 2 {
            startReading(connection)
            frameProgress(connection, completedFrame: true)
        }
    }

    // MARK: connections

    /// Closes `connection` once (after its queued writes when `flush`), unsubscribing it from jobs; the
    /// Connection is released when libuv has closed its handle.
    func close(_ connection: Connection, flush: Bool) {
        guard !connection.closing else { return }
        connection.closing = true
        connections[connection.id] = nil
        refusedConnections[connection.id] = nil
        uv_timer_stop(connection.timer)
        uv_close(cgraft_uv_handle(connection.timer)) { h in h.map { UnsafeMutableRawPointer($0).deallocate() } }
        for (job, sub) in subscribers where sub.connection == connection.id { subscribers[job] = nil }
        engine.connectionClosed(connection.id)
        let stream = cgraft_uv_stream(connection.handle)
        uv_read_stop(stream)
        let closeHandle: (UnsafeMutableRawPointer) -> Void = { handle in
            uv_close(cgraft_uv_handle(handle)) { h in
                guard let h else { return }
                if let data = h.pointee.data { Unmanaged<Connection>.fromOpaque(data).release() }
                UnsafeMutableRawPointer(h).deallocate()
            }
        }
        if flush && connection.pendingWrites > 0 {
            // Let queued responses (e.g. the error that explains the close) reach the client first.
            let request = UnsafeMutablePointer<uv_shutdown_t>.allocate(capacity: 1)
            if uv_shutdown(request, stream, { request, _ in
                guard let request else { return }
                if let handle = request.pointee.handle {
                    uv_close(cgraft_uv_handle(handle)) { h in
                        guard let h else { return }
                        if let data = h.pointee.data { Unmanaged<Connection>.fromOpaque(data).release() }
                        UnsafeMutableRawPointer(h).deallocate()
                    }
                }
                request.deallocate()
            }) != 0 {
                request.deallocate()
                closeHandle(connection.handle)
            }
        } else {
            closeHandle(connection.handle)
        }
        log("conn=\(connection.id) event=close")
    }
}
