import Foundation
import Testing

/// Fixture and asset locations for the GraftText tests.
enum TextTestSupport {
    /// `Tests/Fixtures`, found relative to this source file.
    static let fixtures: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures").path
    }()

    /// `${GRAFT_HOME:-$HOME/.cache/graft}`.
    static let graftHome: String = {
        let env = ProcessInfo.processInfo.environment
        if let home = env["GRAFT_HOME"], !home.isEmpty { return home }
        let user = env["HOME"] ?? NSHomeDirectory()
        return user + "/.cache/graft"
    }()

    /// The path of a downloaded asset under GRAFT_HOME, or nil after recording a failure that says how to
    /// fetch it (tests never skip on a missing asset).
    static func asset(_ relative: String, sourceLocation: SourceLocation = #_sourceLocation) -> String? {
        let path = graftHome + "/" + relative
        if FileManager.default.fileExists(atPath: path) { return path }
        Issue.record("missing asset \(path): run scripts/fetch-assets to download it", sourceLocation: sourceLocation)
        return nil
    }

    /// One fixture case: a text and the ids the reference tokenizer produced.
    struct Case: Decodable {
        let text: String
        let ids: [Int32]
    }

    /// The cases under `key` in `Tests/Fixtures/tokenizers.json`.
    static func cases(_ key: String) throws -> [Case] {
        let data = try Data(contentsOf: URL(fileURLWithPath: fixtures + "/tokenizers.json"))
        let all = try JSONDecoder().decode([String: [Case]].self, from: data)
        guard let cases = all[key] else {
            throw FixtureError(message: "Tests/Fixtures/tokenizers.json has no key \(key)")
        }
        return cases
    }

    struct FixtureError: Error, CustomStringConvertible {
        let message: String
        var description: String { message }
    }

    /// Compares every case, recording one issue per mismatch (text, expected, got); returns the match count.
    @discardableResult
    static func compare(
        _ cases: [Case], label: String, sourceLocation: SourceLocation = #_sourceLocation,
        encode: (String) -> [Int32]
    ) -> Int {
        var matched = 0
        for (i, c) in cases.enumerated() {
            let got = encode(c.text)
            if got == c.ids {
                matched += 1
            } else {
                Issue.record("\(label) case \(i) mismatch\n  text:     \(c.text.debugDescription)\n  expected: \(c.ids)\n  got:      \(got)",
                             sourceLocation: sourceLocation)
            }
        }
        print("\(label): \(matched)/\(cases.count) cases match")
        return matched
    }
}
