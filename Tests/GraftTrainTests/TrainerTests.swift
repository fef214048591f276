import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport
import GraftText
@testable import GraftTrain

/// A small sentiment setup on the real MiniLM: LoRA r4 on query/value + the classifier head.
struct SentimentSetup {
    let model: AdaptedModel
    let classifier: BertForSequenceClassification
    let train: [TokenizedExample]
    let test: [TokenizedExample]

    init(trainCount: Int = 64, testCount: Int = 32, seed: UInt64 = 1, dropout: Double = 0.1) throws {
        let bert = try Assets.loadMiniLM()
        classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: seed)
        model = AdaptedModel(root: classifier)
        try model.addAdapter("default", config: AdapterConfig(
            jsonText: #"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["query","value"],"modules_to_save":["classifier"],"lora_dropout":\#(dropout)}"#,
            source: "test"), seed: seed)
        let tokenizer = try WordPieceTokenizer(vocabFile: Assets.minilm + "/vocab.txt")
        let (tr, te) = try TweetCorpus.demoSubsets(path: try Assets.require(Assets.tweets))
        train = try ExampleTokenizer.classification(Array(tr.prefix(trainCount)), tokenizer: tokenizer, maxLength: 64)
        test = try ExampleTokenizer.classification(Array(te.prefix(testCount)), tokenizer: tokenizer, maxLength: 64)
    }

    func trainer(_ config: TrainerConfig) throws -> Trainer {
        try Trainer(model: model, adapterName: "default", objective: SequenceClassificationObjective(model: classifier), config: config)
    }
}

@Suite(.serialized) struct TrainerTests {
    @Test func tweetSplitIsExactlyThePEFTComparisonSplit() throws {
        let (train, test) = try TweetCorpus.load(path: try Assets.require(Assets.tweets))
        #expect(train.count == 29_795 && test.count == 7_448)
        let (demoTrain, demoTest) = try TweetCorpus.demoSubsets(path: Assets.tweets)
        #expect(demoTrain.count == 2_980 && demoTest.count == 1_490)
        // Values from Python: csv.reader(open(path, encoding="latin-1")), strip, first occurrence, i % 5.
        #expect(train[0].text == "I just don't trust my life in google's hands #driverless cars_\u{D1}_.no thank you")
        #expect(test[0].text == "I totally hate the idea of not driving my own car. Automatics bad enough. Now #autonomous?")
        #expect(Set(train.map(\.label)) == [0, 1, 2])
    }

    @Test func jsonlDatasetsAndTheirErrors() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-jsonl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let cls = dir.appendingPathComponent("cls.jsonl").path
        try Data("{\"text\": \"good\", \"label\": \"pos\"}\n\n{\"text\": \"bad\", \"label\": \"neg\"}\n{\"text\": \"ok\", \"label\": 0}\n".utf8).write(to: URL(fileURLWithPath: cls))
        var labels: [String] = []
        let examples = try JSONLDataset.loadClassification(path: cls, labelNames: &labels)
        #expect(labels == ["pos", "neg"] && examples.map(\.label) == [0, 1, 0])
        let lm = dir.appendingPathComponent("lm.jsonl").path
        try Data("{\"prompt\": \"Q:\", \"completion\": \" A\"}\n{\"text\": \"plain\"}\n{\"nope\": 1}\n".utf8).write(to: URL(fileURLWithPath: lm))
        do {
            _ = try JSONLDataset.loadCompletions(path: lm)
            Issue.record("a line without text was accepted")
        } catch let e as GraftError {
            #expect(e.message.contains(lm + ":3"))
        }
        // Completion-only loss: prompt positions carry no target.
        let tokenizer = try WordPieceTokenizer(vocabFile: try Assets.require(Assets.minilm) + "/vocab.txt")
        let tokenized = try ExampleTokenizer.causalLM([TextCompletion(prompt: "hello there", completion: " world")], tokenizer: tokenizer, maxLength: 16, appendEOS: false)
        #expect(tokenized[0].ids.count == 3 && tokenized[0].targets == [-100, tokenized[0].ids[2], -100])
    }

    @Test func csvHandlesQuotesAndNewlines() {
        let rows = CSVReader.parse(Array("a,b,c\n1,\"x, \"\"y\"\"\nz\",3\r\n".utf8), encoding: .utf8)
        #expect(rows == [["a", "b", "c"], ["1", "x, \"y\"\nz", "3"]])
        #expect(TweetCorpus.pythonStrip("\u{A0} hi\t\u{85}") == "hi")
    }

    @Test func packingMatchesPaddedBatches() throws {
        let setup = try SentimentSetup(trainCount: 6)
        let objective = SequenceClassificationObjective(model: setup.classifier)
        let packed = try withNoGrad { try setup.classifier.forward(try PackedBatch(ArraySlice(setup.train)).tokens, firstTokens: try PackedBatch(ArraySlice(setup.train)).firstTokens) }
        let padded = try withNoGrad { try setup.classifier.forward(try TokenBatch(sequences: setup.train.map(\.ids))) }
        #expect(maxAbsDifference(packed, padded) < 1e-5)
        _ = objective
    }

    @Test func scheduleShapes() {
        let linear = LearningRateSchedule(kind: .linear, warmupSteps: 10, totalSteps: 110)
        #expect(linear.multiplier(at: 0) == 0 && linear.multiplier(at: 5) == 0.5 && linear.multiplier(at: 10) == 1)
        #expect(abs(linear.multiplier(at: 60) - 0.5) < 1e-6 && linear.multiplier(at: 110) == 0)
        let cosine = LearningRateSchedule(kind: .cosine, warmupSteps: 0, totalSteps: 100)
        #expect(cosine.multiplier(at: 0) == 1 && abs(cosine.multiplier(at: 50) - 0.5) < 1e-6 && cosine.multiplier(at: 100) < 1e-6)
        #expect(LearningRateSchedule(kind: .constant, warmupSteps: 4).multiplier(at: 2) == 0.5)
    }

    @Test func clippingBoundsTheGlobalNorm() {
        let a = Tensor(shape: [2], values: [3, 0]).requiringGrad(), b = Tensor(shape: [1], values: [4]).requiringGrad()
        a.grad = Tensor(shape: [2], values: [3, 0])
        b.grad = Tensor(shape: [1], values: [4])
        let norm = clipGradientNorm([a, b], maxNorm: 1)
        #expect(abs(norm - 5) < 1e-6)
        let after = ((a.grad?.scalars.map { $0 * $0 }.reduce(0, +) ?? 0) + (b.grad?.item ?? 0) * (b.grad?.item ?? 0)).squareRoot()
        #expect(abs(after - 1) < 1e-4)
    }

    @Test func sgdWithMomentumFollowsPyTorchsUpdate() {
        let p = Tensor(shape: [1], values: [1]).requiringGrad()
        let sgd = SGD(parameters: [p], learningRate: 0.1, momentum: 0.9)
        p.grad = Tensor(shape: [1], values: [1]); sgd.step()   // b = 1, p = 0.9
        p.grad = Tensor(shape: [1], values: [1]); sgd.step()   // b = 1.9, p = 0.71
        #expect(abs(p.item - 0.71) < 1e-6)
    }

    @Test func gradientAccumulationEqualsOneLargeBatch() throws {
        var config = TrainerConfig()
        config.shuffle = false
        let a = try SentimentSetup(trainCount: 16, dropout: 0)
        config.batchSize = 16
        let ta = try a.trainer(config)
        let b = try SentimentSetup(trainCount: 16, dropout: 0)
        config.batchSize = 8
        config.gradientAccumulationSteps = 2
        let tb = try b.trainer(config)
        _ = try ta.accumulate(try PackedBatch(ArraySlice(a.train)))
        _ = try tb.accumulate(try PackedBatch(ArraySlice(b.train.prefix(8))))
        _ = try tb.accumulate(try PackedBatch(ArraySlice(b.train.suffix(8))))
        for (x, y) in zip(ta.optimizer.parameters, tb.optimizer.parameters) {
            guard let gx = x.grad, let gy = y.grad else { Issue.record("missing gradient"); continue }
            #expect(maxAbsDifference(gx, gy) < 1e-6)
        }
    }

    @Test func shortFineTuneLowersTheLossAndResumesBitIdentically() throws {
        var config = TrainerConfig()
        config.epochs = 2
        config.batchSize = 16
        config.learningRate = 2e-3
        config.warmupSteps = 2
        // Reference: 8 uninterrupted steps.
        let a = try SentimentSetup(trainCount: 64)
        let ta = try a.trainer(config)
        let before = try ta.evaluate(a.train)
        var losses: [Float] = []
        try ta.train(a.train) { p in losses.append(p.loss); return true }
        let after = try ta.evaluate(a.train)
        #expect(losses.count == 8)
        #expect(after.loss < before.loss, "training loss \(before.loss) -> \(after.loss)")

        // Interrupted after 3 steps, checkpointed, restored into a fresh model, continued.
        let b = try SentimentSetup(trainCount: 64)
        let tb = try b.trainer(config)
        try tb.train(b.train) { p in p.step < 3 }
        #expect(tb.globalStep == 3)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-ckpt-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try tb.saveCheckpoint(directory: dir)
        let c = try SentimentSetup(trainCount: 64)
        let tc = try c.trainer(config)
        try tc.loadCheckpoint(directory: dir)
        var resumed: [Float] = []
        try tc.train(c.train) { p in resumed.append(p.loss); return true }
        #expect(resumed == Array(losses.suffix(5)), "resumed losses \(resumed) vs uninterrupted \(Array(losses.suffix(5)))")
        for ((key, x), (_, y)) in zip(try a.model.adapter("default").peftStateDict, try c.model.adapter("default").peftStateDict) {
            #expect(x.scalars == y.scalars, "\(key) differs after resume")
        }
    }
}

