import Foundation
import Testing
@testable import Graft
import GraftTestSupport

/// The Swift side of the C ABI: GraftSession / GraftTrainingSession, tested without the C layer.
@Suite(.serialized) struct GraftSessionTests {
    static let lora = #"{"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}"#

    @Test func perRowAdapterIdsMatchWholeBatchRuns() throws {
        let s = try GraftSession(path: try Assets.require(Assets.minilm), task: .sequenceClassification, numLabels: 3)
        let rows: [[Int32]] = [[101, 7592, 2088, 102], [101, 2204, 102], [101, 6659, 2154, 999, 102]]
        let batch = try s.tokenBatch(ids: rows.flatMap { $0 + [Int32](repeating: 0, count: 5 - $0.count) },
                                     lengths: rows.map(\.count), batch: 3, stride: 5)
        let base = try s.forward(batch: batch, adapterIds: nil, output: .logits)
        try s.addAdapter(name: "a", configJSON: Self.lora)
        // Make the adapter differ from the base: train it one step.
        let t = try GraftTrainingSession(session: s, adapterName: "a", options: TrainingOptions())
        _ = try t.step(try t.examples(batch: batch, labels: [0, 1, 2]))
        let adapted = try s.forward(batch: batch, adapterIds: nil, output: .logits)
        #expect(adapted != base)
        let mixed = try s.forward(batch: batch, adapterIds: [-1, 0, -1], output: .logits)
        for r in 0..<3 {
            let want = r == 1 ? adapted : base
            for c in 0..<3 { #expect(abs(mixed[r * 3 + c] - want[r * 3 + c]) < 1e-5) }
        }
        // The model's adapter state is restored afterwards.
        #expect(s.adapted.activeAdapter == "a" && !s.adapted.adaptersDisabled)
        #expect(throws: GraftError.self) { try s.deleteAdapter(name: "a") }
        t.release()
        try s.deleteAdapter(name: "a")
    }

    @Test func causalLabelsFollowHuggingFaceShift() throws {
        let s = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        try s.addAdapter(name: "lm", configJSON: #"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#)
        let t = try GraftTrainingSession(session: s, adapterName: nil, options: TrainingOptions())
        let batch = try s.tokenBatch(ids: [10, 11, 12, 13, 20, 21, 0, 0], lengths: [4, 2], batch: 2, stride: 4)
        let e = try t.examples(batch: batch, labels: [-100, -100, 12, 13, 5, 21, 0, 0])
        #expect(e[0].ids == [10, 11, 12, 13] && e[0].targets == [-100, 12, 13, -100])
        #expect(e[1].ids == [20, 21] && e[1].targets == [21, -100])
        #expect(try t.examples(batch: batch, labels: nil)[0].targets == [11, 12, 13, -100])
    }
}
