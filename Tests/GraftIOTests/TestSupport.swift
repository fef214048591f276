import Foundation
import Testing
import GraftTensor
@testable import GraftIO

/// Test helpers: fixture paths, temporary directories, and checks on thrown `GraftError`s.
enum TestSupport {
    /// `Tests/Fixtures`, found relative to this source file.
    static let fixtures: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures").path
    }()

    /// A fresh temporary directory for one test.
    static func tempDir() throws -> String {
        let dir = FileManager.default.temporaryDirectory
            .appendingPathComponent("graft-io-tests-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Writes `bytes` to `name` in a fresh temporary directory and returns the path.
    static func writeTemp(_ name: String, _ bytes: [UInt8]) throws -> String {
        let path = try tempDir() + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// Runs `body`, expecting a `GraftError` with `code` whose message contains every string in `mentions`.
    static func expectError(
        _ code: GraftError.Code, mentions: [String],
        sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void
    ) {
        do {
            try body()
            Issue.record("expected a GraftError(\(code)) mentioning \(mentions), but nothing was thrown", sourceLocation: sourceLocation)
        } catch let e as GraftError {
            #expect(e.code == code, "wrong code for message: \(e.message)", sourceLocation: sourceLocation)
            for m in mentions {
                #expect(e.message.contains(m), "message '\(e.message)' does not mention '\(m)'", sourceLocation: sourceLocation)
            }
        } catch {
            Issue.record("expected a GraftError, got \(error)", sourceLocation: sourceLocation)
        }
    }
}

/// Little-endian byte building for hand-made files.
struct ByteBuilder {
    var bytes: [UInt8] = []
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    mutating func le<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func f32(_ v: Float) { le(v.bitPattern) }
    mutating func f64(_ v: Double) { le(v.bitPattern) }
}
