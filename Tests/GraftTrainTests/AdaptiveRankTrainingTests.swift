import Foundation
import Graft
import GraftTestSupport
import Testing

/// IncreLoRA's and TriAdaptLoRA's rank growth inside the Trainer on the demo tweets: ranks change only at the
/// stated steps, the budget is never exceeded, the modules that grow are the ones the method's score picks, the
/// growth is logged, and the trained adapter saves as PEFT LoRA + rank_pattern that loads back to the same logits.
@Suite(.serialized) struct AdaptiveRankTrainingTests {
    static func examples() throws -> [TokenizedExample] {
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (train, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        return try ExampleTokenizer.classification(Array(train.prefix(16)), tokenizer: tokenizer, maxLength: 32)
    }

    /// Trains `json` for `steps` steps, calling `check(step, ranksBefore, ranksAfter)` after each.
    static func train(_ json: [String: Any], steps: Int,
                      check: (Int, [Int], [Int], NamedAdapter) throws -> Void) throws -> (AdaptedModel, BertForSequenceClassification, [Float], [Float]) {
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
        let model = AdaptedModel(root: classifier)
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: json, source: "test"), seed: 1)
        var config = TrainerConfig()
        config.batchSize = 16
        config.learningRate = 5e-3
        config.shuffle = false
        let trainer = try Trainer(model: model, adapterName: "default",
                                  objective: SequenceClassificationObjective(model: classifier), config: config)
        let examples = try examples()
        let before = try trainer.evaluate(examples).loss
        let batch = try PackedBatch(ArraySlice(examples))
        func ranks() -> [Int] { adapter.layers.compactMap { ($0.adapter as? any GrowingRankLayer)?.activeRank } }
        for step in 1...steps {
            let old = ranks()
            _ = try trainer.accumulate(batch)
            try trainer.optimizerStep(totalSteps: steps)
            try check(step, old, ranks(), adapter)
        }
        let after = try trainer.evaluate(examples).loss
        return (model, classifier, [Float(before)], [Float(after)])
    }

    /// Saves `model`'s adapter and loads it through Graft's LoRA path into a fresh classifier with the same head:
    /// the logits agree. With `GRAFT_ADAPTIVE_RANK_EXPORT` set, also writes the adapter, the token ids and Graft's
    /// logits and head to `$GRAFT_ADAPTIVE_RANK_EXPORT/<method>/` for bench/adaptive-rank-peft/check.py (real PEFT's side).
    static func expectLoRARoundTrip(_ model: AdaptedModel, _ classifier: BertForSequenceClassification, ranks: [Int],
                                    method: String) throws {
        let sequences: [[Int32]] = [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 1037, 2204, 2154, 102]]
        let batch = try TokenBatch(sequences: sequences)
        let logits = try withNoGrad { try classifier.forward(batch) }
        if let root = ProcessInfo.processInfo.environment["GRAFT_ADAPTIVE_RANK_EXPORT"] {
            let out = root + "/" + method.lowercased()
            try model.saveAdapter("default", directory: out + "/adapter")
            var writer = SafeTensorsWriter()
            try writer.add("logits", logits)
            try writer.add("input_ids", Tensor(shape: [batch.batchSize, batch.length], values: batch.ids.map(Float.init)))
            try writer.add("lengths", Tensor(shape: [batch.batchSize], values: batch.lengths.map(Float.init)))
            // The head is not part of this adapter (fixed by its seed on both sides of Graft's round trip).
            try writer.add("classifier.weight", classifier.classifier.weight)
            if let bias = classifier.classifier.bias { try writer.add("classifier.bias", bias) }
            try Data(writer.serialized()).write(to: URL(fileURLWithPath: out + "/graft_logits.safetensors"))
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-grown-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try BertForSequenceClassification(bert: try Assets.loadMiniLM(), numLabels: 3, seed: 3)
        let loaded = try AdaptedModel(root: other).loadAdapter(directory: dir)
        #expect(loaded.config.peftType == "LORA")
        #expect(loaded.layers.map { ($0.adapter as? LoRALayer)?.rank ?? -1 } == ranks)
        let again = try withNoGrad { try other.forward(batch) }
        let scale = max(1, logits.scalars.map(abs).max() ?? 1)
        #expect(maxAbsDifference(again, logits) / scale <= 1e-5, "LoRA reload differs by \(maxAbsDifference(again, logits))")
    }

    @Test func increLoRAGrowsTheMostImportantModulesAtItsStepsUpToTheBudget() throws {
        let json: [String: Any] = ["peft_type": "INCRELORA", "init_r": 1, "target_r": 2, "max_r": 4, "lora_alpha": 8,
                                   "tinit": 1, "deltaT": 2, "total_step": 10, "target_modules": ["query", "value"]]
        var logged: [Int] = []
        let (model, classifier, before, after) = try Self.train(json, steps: 10) { step, old, new, adapter in
            let allocator = try #require(adapter.trainingHooks.first as? IncreLoRAAllocator)
            #expect(new.reduce(0, +) <= allocator.budget, "step \(step): total rank \(new.reduce(0, +)) over the budget")
            let growth = step > 1 && step % 2 == 0
            #expect((old != new) == growth, "step \(step): ranks \(old) -> \(new)")
            if growth {
                // One rank each to the highest-scoring modules.
                let grew = new.indices.filter { new[$0] > old[$0] }
                let scores = allocator.lastScores
                let lowestGrown = grew.map { scores[$0] }.min() ?? .infinity
                let highestSkipped = new.indices.filter { !grew.contains($0) && old[$0] < 4 }.map { scores[$0] }.max() ?? -.infinity
                #expect(lowestGrown >= highestSkipped, "step \(step): grew \(grew) with scores \(scores)")
                #expect(grew.allSatisfy { new[$0] == old[$0] + 1 })
            }
            let lines = allocator.takeLogLines()
            if !lines.isEmpty { logged.append(step) }
            if step == 10 {
                #expect(new.reduce(0, +) == allocator.budget, "the budget is reached at the last growth step")
                let report = allocator.reportLines()
                #expect(report.count == 1 + new.count && report[1].hasPrefix("  bert.encoder.layer.0.attention.self.query: 1 "))
                print(report.joined(separator: "\n"))
            }
        }
        #expect(logged == [2, 4, 6, 8, 10])
        #expect(after[0] < before[0], "IncreLoRA training loss \(before[0]) -> \(after[0])")
        let adapter = try model.adapter("default")
        try Self.expectLoRARoundTrip(model, classifier, ranks: adapter.layers.compactMap { ($0.adapter as? any GrowingRankLayer)?.activeRank },
                                      method: "INCRELORA")
    }

    @Test func triAdaptLoRAGrowsModulesPastTheDynamicThreshold() throws {
        let json: [String: Any] = ["peft_type": "TRIADAPTLORA", "init_r": 1, "target_r": 2, "max_r": 4, "lora_alpha": 8,
                                   "incre_rank_num": 1, "incre_interval": 2, "total_step": 10, "target_modules": ["query", "value"]]
        let (model, classifier, before, after) = try Self.train(json, steps: 10) { step, old, new, adapter in
            let allocator = try #require(adapter.trainingHooks.first as? TriAdaptLoRAAllocator)
            let total = old.reduce(0, +)
            #expect(new.reduce(0, +) <= allocator.budget, "step \(step): total rank \(new.reduce(0, +)) over the budget")
            if step % 2 != 0 || total >= allocator.budget {
                #expect(old == new, "step \(step): no growth expected")
                return
            }
            // Linear threshold: k = ⌊(budget − total) · step / total_step⌋ (at least 1) modules pass it.
            let k = allocator.modulesToGrow(step: step, total: 10, remaining: allocator.budget - total)
            #expect(k == max(1, min(new.count, (allocator.budget - total) * step / 10)))
            let scores = allocator.lastScores
            let threshold = scores.sorted(by: >)[k - 1]
            let grew = new.indices.filter { new[$0] > old[$0] }
            #expect(grew.allSatisfy { scores[$0] >= threshold && new[$0] == old[$0] + 1 }, "step \(step): grew \(grew)")
            let passing = scores.indices.filter { scores[$0] >= threshold && old[$0] < 4 }.count
            #expect(grew.count == min(passing, allocator.budget - total), "step \(step): \(grew.count) grew, \(passing) passed")
            #expect(!allocator.takeLogLines().isEmpty)
        }
        #expect(after[0] < before[0], "TriAdaptLoRA training loss \(before[0]) -> \(after[0])")
        let adapter = try model.adapter("default")
        let ranks = adapter.layers.compactMap { ($0.adapter as? any GrowingRankLayer)?.activeRank }
        #expect(ranks.reduce(0, +) > ranks.count, "some module grew: \(ranks)")
        print("TriAdaptLoRA ranks after 10 steps: \(ranks)")
        try Self.expectLoRARoundTrip(model, classifier, ranks: ranks, method: "TRIADAPTLORA")
    }
}
