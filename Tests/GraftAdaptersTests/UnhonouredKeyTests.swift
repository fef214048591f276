import Foundation
import Testing
@testable import GraftAdapters
import GraftModels
import GraftTensor

/// No adapter_config.json setting is silently ignored: a key no method reads fails with its name and the keys the
/// method does honour; the same key at PEFT's neutral value (null, false, 0, empty) loads.
@Suite struct UnhonouredKeyTests {
    static func toyModel() -> AdaptedModel {
        var rng = GraftRNG(seed: 1)
        let proj = Linear(weight: Tensor.randomNormal([64, 64], rng: &rng), bias: Tensor.randomNormal([64], rng: &rng))
        return AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
    }

    func rejection(_ json: String) -> String? {
        do {
            _ = try Self.toyModel().addAdapter("a", config: AdapterConfig(jsonText: json, source: "adapter_config.json"))
            return nil
        } catch let e as GraftError {
            return e.message
        } catch {
            return "\(error)"
        }
    }

    @Test(arguments: [
        (#""peft_type": "LORA", "use_bdlora": true"#, "use_bdlora"),
        (#""peft_type": "LORA", "layer_replication": [[0, 1]]"#, "layer_replication"),
        (#""peft_type": "LORA", "velora_config": {"rank": 4}"#, "velora_config.rank"),
        (#""peft_type": "LORA", "arrow_config": {"task_adapter_names": ["a"], "colour": 1}"#, "arrow_config.colour"),
        (#""peft_type": "LORA", "fan_in_fan_out": true"#, "fan_in_fan_out"),
        (#""peft_type": "LORA", "bias": "all""#, "bias"),
        (#""peft_type": "MOS", "r": 8, "rank_pattern": {"proj": 4}"#, "rank_pattern"),
        (#""peft_type": "LORA", "made_up_option": 3"#, "made_up_option"),
    ])
    func unreadKeysWithSettingsAreRejectedByName(keys: String, key: String) {
        let message = rejection("{\(keys), \"target_modules\": [\"proj\"]}")
        #expect(message?.contains("'\(key)'") == true, "\(key): \(message ?? "accepted")")
    }

    @Test func iA3HonoursInitIA3Weights() throws {
        let model = Self.toyModel()
        let ones = try model.addAdapter("ones", config: AdapterConfig(jsonText: #"{"peft_type": "IA3", "target_modules": ["proj"]}"#, source: "c"))
        let random = try model.addAdapter("randn", config: AdapterConfig(jsonText: #"{"peft_type": "IA3", "target_modules": ["proj"], "init_ia3_weights": false}"#, source: "c"))
        let onesValues = ones.peftStateDict.first?.tensor.scalars ?? []
        let randomValues = random.peftStateDict.first?.tensor.scalars ?? []
        #expect(!onesValues.isEmpty && onesValues.allSatisfy { $0 == 1 })
        let mean = randomValues.reduce(0, +) / Float(max(randomValues.count, 1))
        let variance = randomValues.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Float(max(randomValues.count, 1))
        #expect(randomValues.count == 64 && abs(mean) < 0.5 && variance > 0.5 && variance < 1.6, "mean \(mean) variance \(variance)")
    }

    @Test func theMessageListsWhatTheMethodHonours() {
        let message = rejection(#"{"peft_type": "LORA", "target_modules": ["proj"], "use_bdlora": true}"#) ?? ""
        #expect(message.contains("'use_bdlora' = true is not supported by Graft's LORA"))
        #expect(message.contains("honours: ") && message.contains("lora_alpha") && message.contains("rank_pattern"))
    }

    @Test func neutralValuesAndDescriptiveKeysLoad() {
        let json = #"""
        {"peft_type": "LORA", "r": 4, "target_modules": ["proj"], "lora_bias": false, "layer_replication": null,
         "trainable_token_indices": null, "fan_in_fan_out": false, "bias": "none", "lora_dropout": 0.0,
         "megatron_core": "megatron.core", "qalora_group_size": 16, "rank_pattern": {}, "eva_config": null,
         "peft_version": "0.21.2", "revision": null, "task_type": "SEQ_CLS", "inference_mode": true,
         "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "auto_mapping": {"x": 1}}
        """#
        #expect(rejection(json) == nil)
    }

    @Test func aRejectedConfigLeavesTheModelUntouched() throws {
        let model = Self.toyModel()
        #expect(throws: GraftError.self) {
            try model.addAdapter("a", config: AdapterConfig(jsonText: #"{"peft_type": "LORA", "target_modules": ["proj"], "use_bdlora": true}"#, source: "c"))
        }
        #expect(model.adapters.isEmpty)
        let lin = model.root.namedModules().compactMap { $0.module as? Linear }.first
        #expect(lin?.adapters.isEmpty == true)
    }
}
