import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// `modules_to_save` on methods that adapt modules other than Linear layers (LayerNorm tuning, prompt learning,
/// trainable tokens): the classification head is trained, saved under PEFT's key and reloaded, as for LoRA.
@Suite struct ModuleAdapterHeadTests {
    @Test(arguments: [
        #"{"peft_type": "LN_TUNING", "target_modules": ["LayerNorm"], "modules_to_save": ["classifier"]}"#,
        #"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "modules_to_save": ["classifier"]}"#,
    ])
    func classifierIsTrainedSavedAndReloaded(json: String) throws {
        let bert = try Assets.loadMiniLM()
        let classifier = try BertForSequenceClassification(bert: bert, numLabels: 3, seed: 3)
        let model = AdaptedModel(root: classifier)
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: "head"))
        let head = adapter.peftStateDict.filter { $0.key.contains("classifier") }
        let headSize: Int = head.reduce(0) { $0 + $1.tensor.count }
        #expect(headSize == 1155, "\(adapter.config.peftType): \(head.map(\.key))")
        for (_, t) in head { for i in 0..<t.count { t.pointer[i] += 0.25 } }
        let batch = try TokenBatch(ids: [101, 2023, 2003, 2307, 102], batchSize: 1, length: 5)
        let out = try withNoGrad { try classifier.forward(batch) }
        let plain = try model.withAdaptersDisabled { try withNoGrad { try classifier.forward(batch) } }
        #expect(maxAbsDifference(out, plain) > 0.1, "the trained head takes part in the forward pass")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-module-head-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let savedNames = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors").names
        #expect(savedNames.contains { $0.contains("classifier") })
        try model.deleteAdapter("default")
        let other = AdaptedModel(root: classifier)
        try other.loadAdapter(directory: dir)
        #expect(maxAbsDifference(try withNoGrad { try classifier.forward(batch) }, out) == 0)
    }
}
