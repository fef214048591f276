import Foundation
import Testing
import GraftIO

@Suite struct FileIOTests {
    @Test func atomicWriteCreatesAndReplaces() throws {
        let dir = try TestSupport.tempDir()
        let path = dir + "/out.bin"
        try AtomicFile.write([1, 2, 3], to: path)
        #expect(try readFile(path) == [1, 2, 3])
        try AtomicFile.write(Data([9, 8]), to: path)
        #expect(try readFile(path) == [9, 8])
        try AtomicFile.write([UInt8](), to: path)
        #expect(try readFile(path) == [])
        // No temporary files are left behind.
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["out.bin"])
        let attrs = try FileManager.default.attributesOfItem(atPath: path)
        #expect(((attrs[.posixPermissions] as? Int) ?? 0) & 0o644 == 0o644)
    }

    @Test func atomicWriteFailureLeavesTargetAlone() throws {
        let dir = try TestSupport.tempDir()
        let path = dir + "/keep.bin"
        try AtomicFile.write([7], to: path)
        struct Boom: Error {}
        #expect(throws: Boom.self) {
            try AtomicFile.write(to: path) { fd, tmp in
                try AtomicFile.writeAll(fd: fd, UnsafeRawBufferPointer(start: nil, count: 0), path: tmp)
                throw Boom()
            }
        }
        #expect(try readFile(path) == [7])
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["keep.bin"])
        TestSupport.expectError(.io, mentions: ["/nonexistent-dir/x.bin", "temporary file"]) {
            try AtomicFile.write([1], to: "/nonexistent-dir/x.bin")
        }
    }

    @Test func readFileErrorsNameThePath() throws {
        TestSupport.expectError(.notFound, mentions: ["/no/such/file.bin", "cannot open"]) { _ = try readFile("/no/such/file.bin") }
        let dir = try TestSupport.tempDir()
        TestSupport.expectError(.io, mentions: [dir, "not a regular file"]) { _ = try readFile(dir) }
    }

    @Test func emptyFilesAreFormatErrors() throws {
        let st = try TestSupport.writeTemp("empty.safetensors", [])
        TestSupport.expectError(.format, mentions: ["empty.safetensors", "truncated file: 0 bytes"]) { _ = try SafeTensorsFile(contentsOf: st) }
        let gg = try TestSupport.writeTemp("empty.gguf", [])
        TestSupport.expectError(.format, mentions: ["empty.gguf", "truncated file: 0 bytes"]) { _ = try GGUFFile(contentsOf: gg) }
    }
}
