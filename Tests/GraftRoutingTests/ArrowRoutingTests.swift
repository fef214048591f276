import Foundation
import Testing
@testable import Graft
@testable import GraftRouting
import GraftTestSupport

/// Arrow over two LoRAs trained on different tasks derived from the tweets must route each task's inputs mostly
/// to its own adapter.
@Suite(.serialized) struct ArrowRoutingTests {
    static let airline = try? NSRegularExpression(
        pattern: "@united|@americanair|@southwestair|@usairways|@jetblue|@virginamerica|@delta|airline|flight", options: [.caseInsensitive])

    static func mentionsAirline(_ s: String) -> Bool {
        airline?.firstMatch(in: s, range: NSRange(s.startIndex..., in: s)) != nil
    }

    @Test func arrowRoutesEachTaskToItsOwnAdapter() throws {
        let start = Date()
        let bert = try Assets.loadMiniLM()
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (train, test) = try TweetCorpus.load(path: try Assets.require(Assets.tweets))
        // Task A: sentiment (the demo labels) of tweets that do not mention airlines.
        // Task B: among airline tweets, "does it mention a flight" (keyword label).
        let sentiment = train.filter { !Self.mentionsAirline($0.text) }
        let flights = train.filter { Self.mentionsAirline($0.text) }.map { LabeledText(text: $0.text, label: $0.text.lowercased().contains("flight") ? 1 : 0) }
        let heldA = test.filter { !Self.mentionsAirline($0.text) }.prefix(32)
        let heldB = test.filter { Self.mentionsAirline($0.text) }.prefix(32)
        #expect(flights.count >= 48 && heldB.count >= 16, "airline tweets: \(flights.count) train, \(heldB.count) test")
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
        let model = AdaptedModel(root: classifier)
        func tok(_ s: some Collection<LabeledText>) throws -> [TokenizedExample] {
            try ExampleTokenizer.classification(Array(s), tokenizer: tokenizer, maxLength: 40)
        }
        for (name, data) in [("sentiment", Array(sentiment.prefix(64))), ("flight", Array(flights.prefix(64)))] {
            let json: [String: Any] = ["peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]]
            try model.addAdapter(name, config: AdapterConfig(json: json, source: name), seed: 7)
            var config = TrainerConfig()
            config.batchSize = 16
            config.epochs = 4
            config.learningRate = 5e-3
            let trainer = try Trainer(model: model, adapterName: name, objective: SequenceClassificationObjective(model: classifier), config: config)
            let loss = try trainer.train(try tok(data))
            print("Arrow library: trained '\(name)' (mean loss \(loss))")
        }
        let arrow = try ArrowRouter(model: model, adapters: ["sentiment", "flight"], topK: 1, temperature: 1)
        var shares: [[Double]] = []
        for held in [Array(heldA), Array(heldB)] {
            arrow.resetStatistics()
            let batch = try PackedBatch(ArraySlice(try tok(held)), padded: false)
            _ = try arrow.withRouting { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }
            shares.append(arrow.shares)
        }
        print("Arrow shares (sentiment, flight): sentiment inputs \(shares[0].map { String(format: "%.3f", $0) }), airline inputs \(shares[1].map { String(format: "%.3f", $0) }) (\(String(format: "%.1f", Date().timeIntervalSince(start))) s)")
        #expect(shares[0][0] > 0.5, "sentiment inputs routed \(shares[0])")
        #expect(shares[1][1] > 0.5, "airline inputs routed \(shares[1])")
        // top-2 with a full softmax reproduces the weighted sum of both adapters: output finite and routing sums to 1.
        arrow.topK = 2
        arrow.resetStatistics()
        let batch = try PackedBatch(ArraySlice(try tok(Array(heldA.prefix(4)))), padded: false)
        let logits = try arrow.withRouting { try classifier.forward(batch.tokens, firstTokens: batch.firstTokens) }
        let finite = logits.scalars.allSatisfy { $0.isFinite }
        #expect(finite)
        #expect(abs(arrow.shares.reduce(0, +) - 1) < 1e-9)
    }
}
