import Foundation
import Testing

/// Locations of the model assets (fetched by scripts/fetch-assets) and the vendored fixtures.
enum Assets {
    static var home: String {
        ProcessInfo.processInfo.environment["GRAFT_HOME"] ?? (NSHomeDirectory() + "/.cache/graft")
    }
    static var minilm: String { home + "/all-MiniLM-L6-v2" }
    static var smollm2: String { home + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }

    /// `Tests/Fixtures/<relative>`.
    static func fixture(_ relative: String) -> String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures").appendingPathComponent(relative).path
    }

    /// The path if it exists; otherwise records a failure that says how to get it.
    static func require(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) -> String? {
        if FileManager.default.fileExists(atPath: path) { return path }
        Issue.record("missing asset \(path): run scripts/fetch-assets (or make test, which does)", sourceLocation: sourceLocation)
        return nil
    }
}

/// max |a − b| over two equal-length buffers.
func maxAbsDifference(_ a: UnsafeBufferPointer<Float>, _ b: UnsafeBufferPointer<Float>) -> Float {
    var m: Float = 0
    for i in 0..<min(a.count, b.count) { m = max(m, abs(a[i] - b[i])) }
    return a.count == b.count ? m : .infinity
}
