import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport
@testable import GraftTrain

/// Replays PEFT + PyTorch's training trace: the same batches from the same initial adapter must give the same
/// loss and gradient norm at every step, and the same final adapter.
@Suite(.serialized) struct TrainingTraceTests {
    struct Trace: Decodable {
        struct Step: Decodable { let step: Int; let loss: Double; let grad_norm: Double }
        let trace: [Step]
    }

    @Test func replayMatchesPEFTStepByStep() throws {
        let trace = try JSONDecoder().decode(Trace.self, from: Data(contentsOf: URL(fileURLWithPath: Assets.fixture("training-minilm/trace.json"))))
        let batches = try SafeTensorsFile(contentsOf: Assets.fixture("training-minilm/batches.safetensors"))
        let cls = try BertForSequenceClassification(bert: try Assets.loadMiniLM(), numLabels: 3)
        let model = AdaptedModel(root: cls)
        let adapter = try model.loadAdapter(directory: Assets.fixture("training-minilm/initial"))
        let params = adapter.parameters
        let optimizer = AdamW(parameters: params, learningRate: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01)
        var worstLoss = 0.0, worstNorm = 0.0
        for step in trace.trace {
            let prefix = String(format: "step%02d.", step.step)
            let batch = try fixtureBatch(batches, prefix: prefix)
            let labels = try batches.int64s(prefix + "labels").map { Int32($0) }
            let logits = try cls.forward(batch)
            let loss = crossEntropy(logits, targets: labels)
            loss.backward()
            let norm = clipGradientNorm(params, maxNorm: nil)
            optimizer.step()
            optimizer.zeroGrad()
            let lossErr = abs(Double(loss.item) - step.loss) / abs(step.loss)
            let normErr = abs(Double(norm) - step.grad_norm) / abs(step.grad_norm)
            worstLoss = worse(worstLoss, lossErr)
            worstNorm = worse(worstNorm, normErr)
            #expect(lossErr <= 1e-4, "step \(step.step): loss \(loss.item) vs PEFT \(step.loss)")
            #expect(normErr <= 1e-4, "step \(step.step): grad norm \(norm) vs PEFT \(step.grad_norm)")
        }
        let final = try SafeTensorsFile(contentsOf: Assets.fixture("training-minilm/final/adapter_model.safetensors"))
        var worstWeight: Float = 0
        for (key, t) in adapter.peftStateDict {
            worstWeight = worse(worstWeight, maxAbsDifference(t, try final.tensor(key)))
        }
        print("training trace: worst relative loss error \(worstLoss), grad-norm error \(worstNorm), final weight max-abs error \(worstWeight)")
        #expect(worstWeight <= 1e-4)
    }

    @Test func frozenWeightsNeverGetGradientsAndLowerLayersRunNoBackward() throws {
        let bert = try Assets.loadMiniLM()
        let batch = try TokenBatch(ids: [101, 2023, 2003, 1037, 3231, 102], batchSize: 1, length: 6)
        func recordedOps(adapting layers: [Int]) throws -> Int {
            let model = AdaptedModel(root: bert)
            try model.addAdapter("a", config: AdapterConfig(jsonText: #"{"peft_type":"LORA","r":4,"target_modules":["query"],"init_lora_weights":false,"layers_to_transform":\#(layers)}"#, source: "test"))
            defer { try? model.deleteAdapter("a") }
            let before = GradMode.recordedOperations
            let out = try bert.forward(batch)
            let recorded = GradMode.recordedOperations - before
            sum(out).backward()
            for (name, t) in bert.namedParameters() {
                #expect(t.grad == nil, "frozen \(name) got a gradient buffer")
            }
            for (_, _, layer) in try model.adapter("a").layers {
                for (_, p) in layer.namedParameters { #expect(p.grad != nil) }
            }
            return recorded
        }
        let top = try recordedOps(adapting: [5])
        let bottom = try recordedOps(adapting: [0])
        let all = try recordedOps(adapting: [0, 1, 2, 3, 4, 5])
        // Only layers at or above the lowest adapter are recorded (and so differentiated).
        #expect(top > 0 && top * 4 < bottom, "adapting only layer 5 recorded \(top) ops, layer 0 \(bottom)")
        #expect(abs(all - bottom) < bottom / 4 + 20)
        let frozen = GradMode.recordedOperations
        _ = try bert.forward(batch)
        #expect(GradMode.recordedOperations == frozen, "a model with no adapter records nothing")
    }
}
