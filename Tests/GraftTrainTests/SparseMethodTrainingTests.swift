import Foundation
import Testing
@testable import GraftAdapters
import GraftModels
import GraftTestSupport
import GraftText
@testable import GraftTrain

/// The selective and sparse methods fine-tuned through ``Trainer`` on the demo tweets (classifier head frozen, so
/// the adapter alone lowers the loss). The periodic schedules run inside the run through the trainer's hooks:
/// SpIEL's drop/regrow rounds keep every layer at its budget, DSEE prunes at its step, ID³ unmasks its whole
/// budget by `unmask_steps`, SparseAdapter's SNIP pruning keeps its share and pruned weights stay zero, SPT
/// settles every layer after its warm-up.
@Suite(.serialized) struct SparseMethodTrainingTests {
    static var configs: [[String: Any]] { [
        ["peft_type": "BITFIT", "target_modules": ["query", "value", "dense"]],
        ["peft_type": "SPIEL", "density": 0.02, "update_interval": 4, "drop_fraction": 0.2, "target_modules": ["query", "value"]],
        ["peft_type": "NEUROADA", "k": 8, "target_modules": ["query", "value"]],
        ["peft_type": "DSEE", "r": 8, "lora_alpha": 16, "num_sparse": 64, "prune_ratio": 0.1, "prune_step": 6, "target_modules": ["query", "value"]],
        ["peft_type": "ID3", "density": 0.02, "unmask_steps": 8, "target_modules": ["query", "value"]],
        ["peft_type": "SPARSE_ADAPTER", "reduction_factor": 16, "sparsity": 0.5, "large_sparse": true],
        ["peft_type": "SPT", "budget_density": 0.02, "lora_threshold": 0.03, "r": 4, "lora_alpha": 8, "warmup_steps": 3, "target_modules": ["query", "value"]],
    ] }

    @Test(arguments: 0..<7)
    func twelveStepsLowerTheTrainingLoss(index: Int) throws {
        let json = Self.configs[index]
        let name = json["peft_type"] as? String ?? "?"
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 1)
        let model = AdaptedModel(root: classifier)
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: json, source: name), seed: 1)
        let budgets = adapter.layers.compactMap { ($0.adapter as? SpIELLayer)?.delta.count }
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (tr, _) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        let train = try ExampleTokenizer.classification(Array(tr.prefix(96)), tokenizer: tokenizer, maxLength: 48)
        var config = TrainerConfig()
        config.batchSize = 8
        config.learningRate = 5e-3
        config.shuffle = false
        let trainer = try Trainer(model: model, adapterName: "default", objective: SequenceClassificationObjective(model: classifier), config: config)
        let before = try trainer.evaluate(train)
        try trainer.train(train, maxSteps: 12)
        let after = try trainer.evaluate(train)
        print("\(name): training loss \(before.loss) -> \(after.loss), \(adapter.parameterCount) trainable")
        #expect(after.loss.isFinite && after.loss < before.loss, "\(name): training loss \(before.loss) -> \(after.loss)")
        let spiel = adapter.layers.compactMap { $0.adapter as? SpIELLayer }
        for (layer, budget) in zip(spiel, budgets) {
            #expect(layer.rounds == 2, "SpIEL ran \(layer.rounds) drop/regrow rounds in 12 steps (interval 4)")
            #expect(layer.delta.count == budget && Set(layer.delta.positions).count == budget)
        }
        if name == "DSEE" {
            // Pruned at step 6 and trained on: merged, each weight has exactly its pruned share of zeros.
            try model.merge("default")
            for (path, lin, layer) in adapter.layers {
                guard let dsee = layer as? DSEELayer else { continue }
                #expect(dsee.isPruned && dsee.prunedCount == Int(0.1 * 384 * 384), "\(path)")
                #expect(lin.weight.scalars.filter { $0 == 0 }.count == dsee.prunedCount, "\(path): zeros after merge")
            }
            try model.unmerge("default")
        }
        for layer in adapter.layers.compactMap({ $0.adapter as? ID3Layer }) {
            #expect(layer.unmaskedCount == layer.budget, "ID3 unmasked \(layer.unmaskedCount) of \(layer.budget) by step 12 (schedule: 8)")
            let live = layer.values.scalars.prefix(layer.unmaskedCount), masked = layer.values.scalars.dropFirst(layer.unmaskedCount)
            #expect(live.contains { $0 != 0 } && masked.allSatisfy { $0 == 0 })
        }
        let spt = adapter.layers.compactMap { $0.adapter as? SPTLayer }
        #expect(spt.allSatisfy { $0.mode != .warmingUp }, "SPT still warming up after step 3")
        if !spt.isEmpty { print("SPT modes: \(spt.map { $0.mode == .lora ? "LoRA" : "sparse \($0.rowIndex.count)" }.joined(separator: ", "))") }
        for (_, module) in adapter.modules {
            guard let sparse = module as? SparseAdapterLayer else { continue }
            let masks = try #require(sparse.masks, "SparseAdapter never pruned")
            for (name, w) in sparse.prunable {
                let mask = try #require(masks[name])
                let kept = mask.scalars.filter { $0 == 1 }.count
                #expect(kept == Int((0.5 * Double(w.count)).rounded(.up)), "\(name): kept \(kept) of \(w.count)")
                #expect((0..<w.count).allSatisfy { mask.pointer[$0] == 1 || w.pointer[$0] == 0 }, "\(name): a pruned weight moved")
            }
        }
    }
}
