import Foundation
import GraftTensor

/// The code each fuzz target runs on one input, shared by the libFuzzer entry points (`Fuzz/Sources/Fuzz*`) and
/// the regression test that replays the committed corpus (`Fuzz/Tests`), so both exercise exactly the same calls.
///
/// A harness returns normally for any input: a rejected input is a thrown `GraftError` that the harness catches
/// and checks (its message must not be empty); anything else (a trap, an out-of-bounds access, a huge
/// allocation, a hang) is what the fuzzer reports.
public enum FuzzHarness {
    /// The fuzz targets by name, as used for `Fuzz/corpus/<name>` and `Fuzz/regressions/<name>`.
    public static let targets: [String: @Sendable (UnsafeRawBufferPointer) -> Void] = [
        "safetensors": safeTensors,
        "gguf": gguf,
        "adapter-config": adapterConfig,
        "frame": frame,
        "tokenizer": tokenizer,
    ]

    /// `${GRAFT_HOME:-$HOME/.cache/graft}`, where scripts/fetch-assets keeps the models the tokenizer target loads.
    public static var assetHome: String {
        ProcessInfo.processInfo.environment["GRAFT_HOME"] ?? (NSHomeDirectory() + "/.cache/graft")
    }

    /// Runs `body`, accepting a `GraftError` with a message; any other error is a harness bug worth a crash
    /// report, because user input must surface as `GraftError`.
    static func expectGraftError(_ what: String, _ body: () throws -> Void) {
        do {
            try body()
        } catch let error as GraftError {
            if error.message.isEmpty { fatalError("\(what): GraftError \(error.code) with an empty message") }
        } catch {
            fatalError("\(what): threw \(type(of: error)) instead of GraftError: \(error)")
        }
    }
}
