import Foundation
import Testing
@testable import Graft
import GraftTestSupport

/// The typed options every door translates into: defaults, checks that name the field, JSON that tells numbers
/// from booleans, and the step budget that overrides epochs.
@Suite struct OptionsTests {
    @Test func defaultsAreValidAndMeanWhatTheDocsSay() throws {
        try ModelOptions().validate()
        try SamplingOptions().validate()
        let o = TrainingOptions()
        try o.validate()
        let c = try o.trainerConfig()
        #expect(c.maxGradNorm == 1 && c.learningRate == 1e-3 && c.weightDecay == 0.01 && c.schedule == .linear)
        var off = TrainingOptions()
        off.maxGradNorm = 0
        #expect(try off.trainerConfig().maxGradNorm == nil, "max_grad_norm 0 means no clipping")
    }

    @Test func invalidValuesNameTheirField() {
        func message(_ body: () throws -> Void) -> String {
            do { try body(); return "" } catch let e as GraftError { return e.message } catch { return "\(error)" }
        }
        var s = SamplingOptions()
        s.topP = 0
        #expect(message { try s.validate() }.hasPrefix("top_p must be in (0, 1]"))
        s = SamplingOptions()
        s.temperature = .nan
        #expect(message { try s.validate() }.hasPrefix("temperature"))
        var t = TrainingOptions()
        t.maxGradNorm = -1
        #expect(message { try t.validate() }.hasPrefix("max_grad_norm must be ≥ 0 (0 = no clipping), got -1"))
        t = TrainingOptions()
        t.learningRate = .infinity
        #expect(message { try t.validate() }.hasPrefix("learning_rate"))
        var m = ModelOptions()
        m.task = .sequenceClassification
        m.numLabels = 0
        #expect(message { try m.validate() }.hasPrefix("num_labels"))
    }

    @Test func jsonZeroAndOneAreNumbersAndBooleansAreNot() throws {
        var o = TrainingOptions()
        try o.update(json: #"{"momentum": 0, "beta1": 0, "eval_batch_size": 1, "shuffle": false}"#,
                     allowed: TrainingOptions.extrasKeys, source: "extras")
        #expect(o.momentum == 0 && o.beta1 == 0 && o.evalBatchSize == 1 && o.shuffle == false)
        try o.update(json: #"{"momentum": 0.5}"#, source: "extras")
        #expect(o.momentum == 0.5)
        #expect(throws: GraftError.self) { try o.update(json: #"{"momentum": true}"#, source: "extras") }
        #expect(throws: GraftError.self) { try o.update(json: #"{"shuffle": 1}"#, source: "extras") }
        #expect(throws: GraftError.self) { try o.update(json: #"{"eval_batch_size": 2.5}"#, source: "extras") }
        do {
            try o.update(json: #"{"learning_rate": 0.1}"#, allowed: TrainingOptions.extrasKeys, source: "extras_json")
            Issue.record("a field outside the allowed keys was accepted")
        } catch let e as GraftError {
            #expect(e.message.contains("unknown key 'learning_rate'") && e.message.contains("momentum"))
        }
        try o.update(json: #"{"schedule": "cosine", "optimizer": "sgd", "max_grad_norm": 0}"#, source: "config")
        #expect(o.schedule == .cosine && o.optimizer == .sgd && o.maxGradNorm == 0)
        #expect(throws: GraftError.self) { try o.update(json: #"{"schedule": "steep"}"#, source: "config") }
        #expect(throws: GraftError.self) { try o.update(json: "[1]", source: "config") }
        #expect(throws: GraftError.self) { try o.update(json: "{", source: "config") }
    }

    @Test func stepBudgetOverridesEpochsAndTheScheduleSpansIt() throws {
        let s = try GraftSession(path: try Assets.require(Assets.minilm), task: .sequenceClassification, numLabels: 3)
        try s.addAdapter(name: "a", configJSON: #"{"peft_type": "LORA", "r": 4, "target_modules": ["query"]}"#)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-steps-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let data = dir.appendingPathComponent("train.jsonl")
        // 6 examples, batch 4: 2 steps per epoch; a budget of 5 steps needs 3 epochs.
        let lines = ["great day", "awful", "fine", "love it", "hate it", "meh"].enumerated().map { #"{"text": "\#($1)", "label": \#($0 % 3)}"# }
        try lines.joined(separator: "\n").write(to: data, atomically: true, encoding: .utf8)
        var o = TrainingOptions()
        o.batchSize = 4
        o.totalSteps = 5
        o.schedule = .linear
        let t = try GraftTrainingSession(session: s, adapterName: "a", options: o)
        var seen: [TrainingProgress] = []
        try t.train(file: data.path) { seen.append($0); return true }
        #expect(seen.map(\.step) == [1, 2, 3, 4, 5])
        #expect(seen.allSatisfy { $0.totalSteps == 5 })
        #expect(seen.last?.epoch == 2)
        // Linear decay spans the 5 steps: the last step's rate is 1/5 of the peak.
        #expect(abs((seen.last?.learningRate ?? 0) - o.learningRate / 5) < 1e-9)
        #expect(throws: GraftError.self) { try t.train(file: data.path) { _ in true } }
    }
}
