import Foundation
import Testing
@testable import Graft
import GraftTestSupport

/// String labels keep their numbering across runs (issue 11, item 14): the names found in the data are saved
/// with the adapter as `labels.json` (transformers' id2label / label2id) and used again when it is loaded.
@Suite(.serialized) struct ClassLabelTests {
    static func writeJSONL(_ rows: [(String, String)], to path: String) throws {
        let lines = try rows.map { text, label in
            String(decoding: try JSONSerialization.data(withJSONObject: ["text": text, "label": label]), as: UTF8.self)
        }
        try (lines.joined(separator: "\n") + "\n").write(toFile: path, atomically: true, encoding: .utf8)
    }

    @Test func stringLabelsAreSavedWithTheAdapterAndUsedOnLoad() throws {
        let minilm = try Assets.require(Assets.minilm)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-labels-\(getpid())").path
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // "spam" appears first, so it is class 0 in this file.
        try Self.writeJSONL([("win money now", "spam"), ("see you at lunch", "ham"), ("cheap pills", "spam")], to: dir + "/a.jsonl")

        let first = try GraftSession(path: minilm, task: .sequenceClassification, numLabels: 2, seed: 1)
        try first.addAdapter(name: "default", configJSON: #"{"peft_type": "LORA", "r": 2, "target_modules": ["query"], "modules_to_save": ["classifier"]}"#)
        var options = TrainingOptions()
        options.batchSize = 2
        let training = try GraftTrainingSession(session: first, adapterName: "default", options: options)
        let examples = try training.loadExamples(dir + "/a.jsonl")
        #expect(examples.map(\.label) == [0, 1, 0])
        #expect(first.classNames == ["spam", "ham"])
        #expect(try first.infoJSON().contains(#""id2label":{"0":"spam","1":"ham"}"#))
        try first.saveAdapter("default", directory: dir + "/adapter")
        let saved = try #require(FileManager.default.contents(atPath: dir + "/adapter/labels.json"))
        let object = try #require(try JSONSerialization.jsonObject(with: saved) as? [String: [String: Any]])
        #expect(object["id2label"] as? [String: String] == ["0": "spam", "1": "ham"])
        #expect(object["label2id"] as? [String: Int] == ["spam": 0, "ham": 1])

        // A later run whose data lists "ham" first still numbers by the saved names.
        try Self.writeJSONL([("lunch?", "ham"), ("free prize", "spam")], to: dir + "/b.jsonl")
        let second = try GraftSession(path: minilm, task: .sequenceClassification, numLabels: 2, seed: 2)
        try second.loadAdapter(directory: dir + "/adapter")
        #expect(second.classNames == ["spam", "ham"])
        let again = try GraftTrainingSession(session: second, adapterName: "default", options: options)
        #expect(try again.loadExamples(dir + "/b.jsonl").map(\.label) == [1, 0])

        // A label the saved names do not know is an error naming the file and line.
        try Self.writeJSONL([("hello", "eggs")], to: dir + "/c.jsonl")
        expectGraftError(.format, mentions: ["c.jsonl:1", "'eggs'", "spam"]) { _ = try again.loadExamples(dir + "/c.jsonl") }

        // Names for another number of classes are refused, naming the file.
        let three = try GraftSession(path: minilm, task: .sequenceClassification, numLabels: 3, seed: 2)
        expectGraftError(.invalidArgument, mentions: ["labels.json", "2 class names for 3 classes"]) {
            try three.loadAdapter(directory: dir + "/adapter")
        }
        #expect(three.adapted.adapters.isEmpty)
    }

    @Test func malformedLabelFilesAreNamed() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-labels-bad-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try ClassLabelFile.read(directory: dir) == nil)
        for (text, fragment) in [(#"[1]"#, "'id2label' object"), (#"{"id2label": {"1": "a"}}"#, "key '1'"),
                                 (#"{"id2label": {"0": 3}}"#, "must be a string"), (#"{"id2label": {"0": "a", "1": "a"}}"#, "repeat")] {
            try text.write(toFile: dir + "/labels.json", atomically: true, encoding: .utf8)
            expectGraftError(.format, mentions: ["labels.json", fragment]) { _ = try ClassLabelFile.read(directory: dir) }
        }
    }
}

/// Runs `body`, expecting a `GraftError` with `code` whose message contains every string in `mentions`.
private func expectGraftError(_ code: GraftError.Code, mentions: [String], sourceLocation: SourceLocation = #_sourceLocation,
                              _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected a GraftError(\(code)) mentioning \(mentions), but nothing was thrown", sourceLocation: sourceLocation)
    } catch let e as GraftError {
        #expect(e.code == code, "wrong code for message: \(e.message)", sourceLocation: sourceLocation)
        for m in mentions { #expect(e.message.contains(m), "'\(e.message)' does not mention '\(m)'", sourceLocation: sourceLocation) }
    } catch {
        Issue.record("expected a GraftError, got \(error)", sourceLocation: sourceLocation)
    }
}
