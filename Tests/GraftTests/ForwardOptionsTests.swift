import Foundation
import Testing
@testable import Graft
import GraftTestSupport

/// Forward-request options (issue 11, item 1): defaults, and errors that name the field, the same for every door.
@Suite(.serialized) struct ForwardOptionsTests {
    @Test func defaultsFollowTheTaskAndBadFieldsAreNamed() throws {
        let minilm = try Assets.require(Assets.minilm)
        let bare = try GraftSession(path: minilm, task: .base)
        let classifier = try GraftSession(path: minilm, task: .sequenceClassification, numLabels: 3)
        #expect(try ForwardOptions().validate(for: bare, rows: 2) == .hidden)
        #expect(try ForwardOptions().validate(for: classifier, rows: 2) == .logits)

        var logits = ForwardOptions()
        logits.output = .logits
        do {
            _ = try logits.validate(for: bare, rows: 1)
            Issue.record("logits from a bare encoder were accepted")
        } catch let e as GraftError {
            #expect(e.code == .unsupported && e.message.contains("no head") && e.message.contains("hidden states"))
        }

        try classifier.addAdapter(name: "a", configJSON: #"{"peft_type": "LORA", "r": 2, "target_modules": ["query"]}"#)
        var routed = ForwardOptions()
        routed.adapterIds = [0, -1, 1]
        for (rows, fragment) in [(2, "adapter_ids has 3 entries for 2 rows"), (3, "adapter_ids[2] = 1 names no adapter (have 1")] {
            do {
                _ = try routed.validate(for: classifier, rows: rows)
                Issue.record("\(routed) was accepted for \(rows) rows")
            } catch let e as GraftError {
                #expect(e.code == .invalidArgument && e.message.contains(fragment), "\(e.message)")
            }
        }
        // A valid mixed request runs and gives each row what that row gets alone.
        routed.adapterIds = [0, -1]
        let batch = try classifier.tokenBatch(ids: [101, 2307, 102, 101, 6659, 102], lengths: nil, batch: 2, stride: 3)
        let mixed = try classifier.forward(batch: batch, options: routed)
        let alone = try classifier.forward(batch: batch, adapterIds: [0, 0], output: .logits)
        #expect(mixed.count == 6 && mixed.allSatisfy(\.isFinite))
        #expect(worstOf(zip(mixed[0..<3], alone[0..<3]).map { abs($0 - $1) }, empty: .nan) <= 1e-5)
    }
}
