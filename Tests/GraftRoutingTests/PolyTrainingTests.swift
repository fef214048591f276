import Foundation
import Testing
@testable import Graft
@testable import GraftRouting
import GraftTestSupport

/// Poly / MHR trained with the trainer, each example routed by its own task id.
@Suite(.serialized) struct PolyTrainingTests {
    @Test(arguments: [1, 2]) func polyAndMHRTrainWithPerExampleTaskIDs(splits: Int) throws {
        // Task 0: the sentiment labels; task 1: "mentions a car" (keyword label) on the same 12 tweets.
        let (classifier, examples) = try RoutingFixtures.twoTaskTweets(12)
        let model = AdaptedModel(root: classifier)
        let json: [String: Any] = ["peft_type": "POLY", "r": 4, "n_tasks": 2, "n_skills": 3, "n_splits": splits,
                                   "target_modules": ["query", "value"]]
        let adapter = try model.addAdapter("poly", config: AdapterConfig(json: json, source: "poly"), seed: 1)
        #expect(model.needsPaddedBatches)
        var config = TrainerConfig.fullBatch(examples: examples.count, learningRate: 5e-3)
        config.epochs = 8
        let trainer = try Trainer(model: model, adapterName: "poly", objective: SequenceClassificationObjective(model: classifier), config: config)
        guard let poly = adapter.layers.first?.adapter as? PolyLayer else {
            Issue.record("no Poly layer")
            return
        }
        let router0 = poly.moduleLogits.scalars
        let before = try trainer.evaluate(examples).loss
        try trainer.train(examples, maxSteps: 8)
        let after = try trainer.evaluate(examples).loss
        #expect(after < before - 1e-3, "n_splits \(splits): loss \(before) -> \(after)")
        // Both tasks' router rows were trained (each task's examples reached its own row).
        let width = poly.moduleLogits.shape[1]
        let router1 = poly.moduleLogits.scalars
        for task in 0..<2 {
            var moved: Float = 0
            for j in 0..<width { moved = worse(moved, abs(router1[task * width + j] - router0[task * width + j])) }
            #expect(moved > 1e-4, "task \(task)'s routing logits did not move")
        }
        // A packed batch mixing tasks cannot route per example: a clear error.
        #expect(throws: GraftError.self) { _ = try trainer.accumulate(try PackedBatch(ArraySlice(examples), padded: false)) }
        print("Poly n_splits \(splits), 8 steps on \(examples.count) examples of 2 tasks: loss \(before) -> \(after)")
    }
}
