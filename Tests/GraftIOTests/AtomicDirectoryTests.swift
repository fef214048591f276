import Foundation
import Testing
import GraftIO

@Suite struct AtomicDirectoryTests {
    @Test func sha256MatchesTheStandardVectors() {
        #expect(SHA256.hex([UInt8]()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256.hex(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(SHA256.hex(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        // A million 'a's, fed in uneven pieces, crosses block boundaries every way.
        var hash = SHA256()
        let piece = [UInt8](repeating: 0x61, count: 997)
        var fed = 0
        while fed < 1_000_000 {
            let n = min(piece.count, 1_000_000 - fed)
            piece.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            fed += n
        }
        let digest = hash.finish().map { String(format: "%02x", $0) }.joined()
        #expect(digest == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    @Test func aDirectoryOfItsOwnIsReplacedAsAWhole() throws {
        let root = try TestSupport.tempDir()
        let dir = root + "/ckpt"
        #expect(try AtomicDirectory.write(directory: dir, kind: "test", files: [("a.bin", [1, 2]), ("b.json", [3])],
                                          metadata: ["step": "1"]) == .replaced)
        let first = try SavedDirectory(path: dir)
        #expect(first.manifest?.kind == "test")
        #expect(first.manifest?.metadata == ["step": "1"])
        #expect(try first.contents("a.bin") == [1, 2])
        // A leftover AtomicFile temporary and a stale staging directory are cleared by the next save.
        try Data([9]).write(to: URL(fileURLWithPath: dir + "/.a.bin.tmp-AbC123"))
        try FileManager.default.createDirectory(atPath: root + "/.ckpt.graft-staging-XyZ789", withIntermediateDirectories: false)
        #expect(try AtomicDirectory.write(directory: dir + "/", kind: "test", files: [("a.bin", [4]), ("c.bin", [5])]) == .replaced)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted() == ["a.bin", "c.bin", AtomicDirectory.manifestName])
        #expect(try FileManager.default.contentsOfDirectory(atPath: root) == ["ckpt"])
        let second = try SavedDirectory(path: dir)
        #expect(try second.contents("a.bin") == [4])
        #expect(second.manifest?.files["c.bin"]?.size == 1)
        let attrs = try FileManager.default.attributesOfItem(atPath: dir)
        #expect(((attrs[.posixPermissions] as? Int) ?? 0) & 0o755 == 0o755)
    }

    @Test func otherFilesAreKeptAndASaveGoesInPlace() throws {
        let dir = try TestSupport.tempDir()
        try Data([7]).write(to: URL(fileURLWithPath: dir + "/README.md"))
        try FileManager.default.createDirectory(atPath: dir + "/checkpoint-1", withIntermediateDirectories: false)
        #expect(try AtomicDirectory.write(directory: dir, kind: "adapter", files: [("w.bin", [1])]) == .inPlace)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
                == ["README.md", "checkpoint-1", AtomicDirectory.manifestName, "w.bin"])
        #expect(try SavedDirectory(path: dir).contents("w.bin") == [1])
    }

    @Test func mixedOrTornDirectoriesAreErrorsNamingTheFile() throws {
        let dir = try TestSupport.tempDir() + "/saved"
        try AtomicDirectory.write(directory: dir, kind: "checkpoint", files: [("a.bin", [1, 2, 3]), ("b.bin", [4])])
        // A file from another save (same size, other bytes).
        try Data([1, 2, 9]).write(to: URL(fileURLWithPath: dir + "/a.bin"))
        TestSupport.expectError(.format, mentions: [dir + "/a.bin", "does not match", "mixes files of different saves"]) {
            _ = try SavedDirectory(path: dir)
        }
        // A truncated (torn) file.
        try Data([1]).write(to: URL(fileURLWithPath: dir + "/a.bin"))
        TestSupport.expectError(.format, mentions: [dir + "/a.bin", "1 bytes", "3 bytes"]) { _ = try SavedDirectory(path: dir) }
        // A missing file.
        try FileManager.default.removeItem(atPath: dir + "/a.bin")
        TestSupport.expectError(.format, mentions: [dir + "/a.bin", "missing", "part of a save"]) { _ = try SavedDirectory(path: dir) }
        // A damaged manifest.
        try Data("{\"format\": \"graft-manifest\"".utf8).write(to: URL(fileURLWithPath: dir + "/" + AtomicDirectory.manifestName))
        TestSupport.expectError(.format, mentions: [AtomicDirectory.manifestName, "not a JSON object"]) { _ = try SavedDirectory(path: dir) }
        try Data(#"{"format": "graft-manifest", "version": 1, "kind": "x", "files": {"../etc/passwd": {"size": 1, "sha256": "00"}}}"#.utf8)
            .write(to: URL(fileURLWithPath: dir + "/" + AtomicDirectory.manifestName))
        TestSupport.expectError(.format, mentions: ["../etc/passwd", "not a file name"]) { _ = try SavedDirectory(path: dir) }
    }

    @Test func directoriesWithoutAManifestReadAsTheyAre() throws {
        let dir = try TestSupport.tempDir()
        try Data([5, 6]).write(to: URL(fileURLWithPath: dir + "/x.bin"))
        let saved = try SavedDirectory(path: dir)
        #expect(saved.manifest == nil)
        #expect(saved.contains("x.bin") && !saved.contains("y.bin"))
        #expect(try saved.contents("x.bin") == [5, 6])
        TestSupport.expectError(.notFound, mentions: [dir + "/y.bin"]) { _ = try saved.contents("y.bin") }
    }

    @Test func badNamesAndNonDirectoriesAreRefused() throws {
        let root = try TestSupport.tempDir()
        TestSupport.expectError(.invalidArgument, mentions: ["../x"]) {
            try AtomicDirectory.write(directory: root + "/d", kind: "t", files: [("../x", [1])])
        }
        TestSupport.expectError(.invalidArgument, mentions: [AtomicDirectory.manifestName]) {
            try AtomicDirectory.write(directory: root + "/d", kind: "t", files: [(AtomicDirectory.manifestName, [1])])
        }
        try Data([1]).write(to: URL(fileURLWithPath: root + "/file"))
        TestSupport.expectError(.invalidArgument, mentions: [root + "/file", "not a directory"]) {
            try AtomicDirectory.write(directory: root + "/file", kind: "t", files: [("a", [1])])
        }
    }
}
