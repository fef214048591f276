import Foundation
import Testing
@testable import Graft
import GraftTestSupport

/// EVA and LoRA-GA through the one training path every door uses (GraftTrainingSession): an added adapter is
/// initialized from the first `init_batches` training batches before step 1, exactly as the Swift API's
/// `initializeEVA` / `initializeLoRAGA` do on the same batches; a loaded adapter is never initialized again.
@Suite(.serialized) struct DataDrivenInitTests {
    static func config(_ initWeights: String) -> String {
        #"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"], "init_lora_weights": "\#(initWeights)"}"#
    }

    static func session() throws -> GraftSession {
        try GraftSession(path: try Assets.require(Assets.minilm), task: .sequenceClassification, numLabels: 3, seed: 5)
    }

    /// A tiny learning rate and no weight decay: the one step moves no tensor by more than ~1e-9.
    static func options() -> TrainingOptions {
        var o = TrainingOptions()
        o.batchSize = 16
        o.initBatches = 3
        o.totalSteps = 1
        o.learningRate = 1e-9
        o.weightDecay = 0
        return o
    }

    static func examples(_ t: GraftTrainingSession) throws -> [TokenizedExample] {
        let demo = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets)).train
        return try t.tokenize(.labeled(Array(demo.prefix(80))))
    }

    static func worstDifference(_ a: NamedAdapter, _ b: NamedAdapter) -> Float {
        let bs = Dictionary(uniqueKeysWithValues: b.peftStateDict.map { ($0.key, $0.tensor) })
        guard Set(bs.keys) == Set(a.peftStateDict.map(\.key)) else { return .infinity }
        return worstOf(a.peftStateDict.map { e in bs[e.key].map { maxAbsDifference(e.tensor, $0) } ?? .infinity }, empty: .infinity)
    }

    @Test(arguments: ["eva", "lora_ga"])
    func trainingInitializesAnAddedAdapterAsTheSwiftAPIDoes(_ initWeights: String) throws {
        // Through the training path: train() initializes, then takes one (negligible) step.
        let s1 = try Self.session()
        try s1.addAdapter(name: "default", configJSON: Self.config(initWeights))
        #expect(try s1.adapted.adapter("default").pendingDataInitialization?.rawValue == initWeights)
        let t1 = try GraftTrainingSession(session: s1, adapterName: "default", options: Self.options())
        let data = try Self.examples(t1)
        try t1.train(data) { _ in true }
        let trained = try s1.adapted.adapter("default")
        #expect(trained.pendingDataInitialization == nil && t1.trainer.adapter === trained && t1.trainer.globalStep == 1)

        // The Swift API on the same batches: the first init_batches batches of epoch 0's order.
        let s2 = try Self.session()
        try s2.addAdapter(name: "default", configJSON: Self.config(initWeights))
        let t2 = try GraftTrainingSession(session: s2, adapterName: "default", options: Self.options())
        let order = t2.trainer.order(epoch: 0, count: data.count)
        let batches = try (0..<3).map { b in
            try PackedBatch(ArraySlice(order[(b * 16)..<((b + 1) * 16)].map { data[$0] }), padded: false)
        }
        let objective = t2.trainer.objective
        if initWeights == "eva" {
            try s2.adapted.initializeEVA("default") { for b in batches { _ = try objective.loss(b) } }
        } else {
            try s2.adapted.initializeLoRAGA("default") { for b in batches { try objective.loss(b).backward() } }
        }
        let api = try s2.adapted.adapter("default")
        let gap = Self.worstDifference(trained, api)
        print("\(initWeights) via GraftTrainingSession.train vs AdaptedModel API on the same 3 batches: max-abs \(gap)")
        #expect(gap <= 1e-6)

        // And not what a data-free initialization (Gaussian A, zero B) of the same seed gives.
        let s3 = try Self.session()
        try s3.addAdapter(name: "default", configJSON: Self.config("gaussian"))
        let plain = try s3.adapted.adapter("default")
        let plainA = plain.peftStateDict.first { $0.key.hasSuffix("query.lora_A.weight") }?.tensor
        let initA = trained.peftStateDict.first { $0.key.hasSuffix("query.lora_A.weight") && $0.key.contains("layer.0.") }?.tensor
        if let plainA, let initA, plainA.shape == initA.shape {
            #expect(maxAbsDifference(plainA, initA) > 0.05)
        }
        #expect(initA != nil)
    }

    @Test func aLoadedAdapterIsNeverInitializedAgain() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-eva-loaded-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s1 = try Self.session()
        try s1.addAdapter(name: "default", configJSON: Self.config("eva"))
        var o = Self.options()
        o.learningRate = 1e-2
        o.totalSteps = 3
        let t1 = try GraftTrainingSession(session: s1, adapterName: "default", options: o)
        try t1.train(try Self.examples(t1)) { _ in true }
        try s1.saveAdapter("default", directory: dir)
        let saved = try s1.adapted.adapter("default")
        #expect(saved.config.value("init_lora_weights") as? String == "eva", "the saved config still says eva")

        let s2 = try Self.session()
        let loaded = try s2.loadAdapter(directory: dir)
        #expect(loaded.pendingDataInitialization == nil)
        let t2 = try GraftTrainingSession(session: s2, adapterName: "default", options: Self.options())
        try t2.train(try Self.examples(t2)) { _ in true }
        let gap = Self.worstDifference(try s2.adapted.adapter("default"), saved)
        print("loaded EVA adapter after one step at lr 1e-9: max-abs change \(gap)")
        #expect(gap <= 1e-6)
    }

    /// A run stopped after step 2 and resumed from its checkpoint in a fresh session (where the added EVA adapter
    /// waits for data again, at the config's uniform rank) continues with the initialized, rank-redistributed
    /// adapter of the checkpoint, never initializing again, and ends where the uninterrupted run ends.
    @Test func anEVARunResumesFromACheckpointInItsMiddle() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-eva-resume-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var o = Self.options()
        o.learningRate = 1e-2
        o.totalSteps = 4
        let config = #"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"], "init_lora_weights": "eva", "eva_config": {"rho": 2}}"#
        func run(stopAfter: Int?) throws -> (GraftSession, GraftTrainingSession) {
            let s = try Self.session()
            try s.addAdapter(name: "default", configJSON: config)
            let t = try GraftTrainingSession(session: s, adapterName: "default", options: o)
            do {
                try t.train(try Self.examples(t)) { p in stopAfter.map { p.step < $0 } ?? true }
            } catch let e as GraftError where e.code == .cancelled && stopAfter != nil {}
            return (s, t)
        }
        let (whole, _) = try run(stopAfter: nil)
        let (_, stopped) = try run(stopAfter: 2)
        #expect(stopped.trainer.globalStep == 2)
        try stopped.trainer.saveCheckpoint(directory: dir)
        let ranks = Set(stopped.trainer.adapter.peftStateDict.filter { $0.key.hasSuffix("lora_A.weight") }.map { $0.tensor.shape[0] })

        let s = try Self.session()
        try s.addAdapter(name: "default", configJSON: config)
        let t = try GraftTrainingSession(session: s, adapterName: "default", options: o)
        try t.trainer.loadCheckpoint(directory: dir)
        #expect(t.trainer.globalStep == 2 && t.trainer.adapter.pendingDataInitialization == nil)
        try t.train(try Self.examples(t)) { _ in true }
        let gap = Self.worstDifference(try s.adapted.adapter("default"), try whole.adapted.adapter("default"))
        print("EVA run resumed at step 2 of 4 (ranks after init \(ranks.sorted())): max-abs difference from the uninterrupted run \(gap)")
        #expect(gap <= 1e-6)
    }

    @Test func initBatchesIsAValidatedTrainingOption() throws {
        var o = TrainingOptions()
        try o.update(json: #"{"init_batches": 2}"#, allowed: TrainingOptions.extrasKeys, source: "extras_json")
        #expect(o.initBatches == 2 && o.json.contains(#""init_batches":2"#))
        o.initBatches = 0
        #expect(throws: GraftError.self) { try o.validate() }
    }
}
