import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// EVA (`init_lora_weights: "eva"`): Graft's own initialisation from data against PEFT's
/// `initialize_lora_eva_weights` on the same eight sentences (scripts/fixtures/peft-minilm-lora-options.py).
/// PEFT fits an incremental randomized PCA until its components stop moving (cosine ≥ 0.99); Graft computes the
/// exact PCA, so the ranks must agree and each of Graft's components must lie in PEFT's subspace to a stated
/// tolerance, not bit for bit.
@Suite(.serialized) struct EVATests {
    let dir = Assets.fixture("peft-minilm-lora-options/eva")

    /// Runs each sentence of the fixture's batch as its own unpadded sequence.
    func runInputs(_ bert: BertModel) throws {
        let file = try SafeTensorsFile(contentsOf: dir + "/eva_inputs.safetensors")
        guard let info = file.info("input_ids"), info.shape.count == 2 else { throw GraftError.format("eva_inputs: no input_ids") }
        let (b, t) = (info.shape[0], info.shape[1])
        let ids = try file.int64s("input_ids"), mask = try file.int64s("attention_mask")
        for r in 0..<b {
            let n = mask[(r * t)..<((r + 1) * t)].filter { $0 == 1 }.count
            let row = ids[(r * t)..<(r * t + n)].map { Int32($0) }
            _ = try bert.forward(try TokenBatch(ids: row, batchSize: 1, length: n, lengths: [n]))
        }
    }

    @Test func graftsEVAMatchesPEFTsRanksAndSubspaces() throws {
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any] ?? [:]
        let pattern = config["rank_pattern"] as? [String: Int] ?? [:]
        let components = try SafeTensorsFile(contentsOf: dir + "/eva_components.safetensors")
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let json = #"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["query","value","intermediate.dense"],"init_lora_weights":"eva","eva_config":{"rho":2.0}}"#
        try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: "eva"))
        let base = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(try fixtureBatch(try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors")))) } }
        let ranks = try model.initializeEVA("default") { try runInputs(bert) }
        var rankMismatches: [String] = []
        for name in components.names {
            let expected = components.info(name)?.shape.first ?? -1
            #expect(pattern[name] ?? 4 == expected)
            if ranks[name] != expected { rankMismatches.append("\(name): Graft \(ranks[name] ?? -1), PEFT \(expected)") }
        }
        print("EVA ranks: \(ranks.count - rankMismatches.count)/\(ranks.count) layers as PEFT's; differing: \(rankMismatches)")
        #expect(rankMismatches.isEmpty)
        // Each of Graft's components projected onto PEFT's subspace keeps ≥ 0.99 of its norm.
        let adapter = try model.adapter("default")
        var worst = 1.0
        for (path, _, layer) in adapter.layers {
            guard let lora = layer as? LoRALayer, components.contains(path) else { continue }
            let peft = try components.tensor(path)
            let overlap = withNoGrad { matmul(lora.loraA, peft, transposeB: true) }  // [r_graft, r_peft]
            let (rg, rp) = (overlap.shape[0], overlap.shape[1])
            for i in 0..<min(rg, rp) {
                let captured = (0..<rp).reduce(0.0) { $0 + Double(overlap.pointer[i * rp + $1] * overlap.pointer[i * rp + $1]) }
                worst = min(worst, captured.squareRoot())
            }
            #expect(lora.loraB.scalars.allSatisfy { $0 == 0 })
        }
        print("EVA: worst norm of a Graft component inside PEFT's subspace \(worst)")
        #expect(worst >= 0.99)
        // B = 0: the initialised adapter is the base model.
        let out = try withNoGrad { try bert.forward(try fixtureBatch(try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors")))) }
        #expect(maxAbsDifference(out, base) < 1e-5)
    }

    @Test func evaNeedsAnEVAAdapterAndData() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        try model.addAdapter("plain", config: AdapterConfig(jsonText: #"{"peft_type":"LORA","r":2,"target_modules":["query"]}"#, source: "plain"))
        #expect(throws: GraftError.self) { try model.initializeEVA("plain") {} }
        try model.addAdapter("eva", config: AdapterConfig(jsonText: #"{"peft_type":"LORA","r":2,"target_modules":["query"],"init_lora_weights":"eva"}"#, source: "eva"))
        #expect(throws: GraftError.self) { try model.initializeEVA("eva") {} }
        #expect(throws: GraftError.self) {
            try model.addAdapter("bad", config: AdapterConfig(jsonText: #"{"peft_type":"LORA","r":2,"target_modules":["query"],"init_lora_weights":"eva","eva_config":{"rho":0.5}}"#, source: "eva"))
        }
    }
}
