import Foundation
import Testing
import GraftFuzzHarness

/// Replays every committed fuzz input (the seed corpora in `Fuzz/corpus/<target>` and the crashers the fuzzers
/// found in `Fuzz/regressions/<target>`) through the same harness the fuzz targets run, without sanitizers: each
/// must come back as success or a `GraftError`, never a trap.
@Suite struct FuzzRegressionTests {
    static let fuzzDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()

    static func inputs(_ kind: String, _ target: String) -> [URL] {
        let dir = fuzzDirectory.appendingPathComponent(kind).appendingPathComponent(target)
        let files = (try? FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)) ?? []
        return files.filter { !$0.lastPathComponent.hasPrefix(".") }.sorted { $0.path < $1.path }
    }

    @Test(arguments: ["safetensors", "gguf", "adapter-config", "frame", "tokenizer"])
    func committedInputsReplayWithoutCrashing(target: String) throws {
        let harness = try #require(FuzzHarness.targets[target], "no harness for \(target)")
        let corpus = Self.inputs("corpus", target)
        #expect(!corpus.isEmpty, "Fuzz/corpus/\(target) has no seed inputs")
        for url in corpus + Self.inputs("regressions", target) {
            let data = try Data(contentsOf: url)
            data.withUnsafeBytes { harness($0) }
        }
    }
}
