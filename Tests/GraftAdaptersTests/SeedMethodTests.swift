import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// Seed-catalog methods without a PEFT fixture (ETHER, ETHER+, bottleneck adapters, MoS, LoReFT): on the real
/// MiniLM they merge where mergeable (and refuse clearly where not), and survive a save → load round trip under
/// their own safetensors keys.
@Suite(.serialized) struct SeedMethodTests {
    /// Name, config, mergeable, and the parameter names (key suffixes) the saved file must hold.
    static let configs: [(String, String, Bool, Set<String>)] = [
        ("ETHER", #"{"peft_type":"ETHER","nb":4,"side":"input","target_modules":["query","value"]}"#, true, ["ether_u"]),
        ("ETHER both", #"{"peft_type":"ETHER","nb":2,"side":"both","target_modules":["query","value"]}"#, true, ["ether_u", "ether_u_out"]),
        ("ETHER+", #"{"peft_type":"ETHER_PLUS","nb":4,"side":"both","target_modules":["query","value"]}"#, true,
         ["ether_u", "ether_v", "ether_u_out", "ether_v_out"]),
        ("SEQ_BN", #"{"peft_type":"SEQ_BN","reduction_factor":16}"#, false,
         ["output_adapter.adapter_down.weight", "output_adapter.adapter_down.bias", "output_adapter.adapter_up.weight", "output_adapter.adapter_up.bias"]),
        ("DOUBLE_SEQ_BN", #"{"peft_type":"DOUBLE_SEQ_BN","reduction_factor":32,"leave_out":[0]}"#, false,
         ["mh_adapter.adapter_down.weight", "mh_adapter.adapter_down.bias", "mh_adapter.adapter_up.weight", "mh_adapter.adapter_up.bias",
          "output_adapter.adapter_down.weight", "output_adapter.adapter_down.bias", "output_adapter.adapter_up.weight", "output_adapter.adapter_up.bias"]),
        ("PAR_BN", #"{"peft_type":"PAR_BN","reduction_factor":8,"mh_adapter":true,"non_linearity":"gelu"}"#, false,
         ["mh_adapter.adapter_down.weight", "mh_adapter.adapter_down.bias", "mh_adapter.adapter_up.weight", "mh_adapter.adapter_up.bias",
          "output_adapter.adapter_down.weight", "output_adapter.adapter_down.bias", "output_adapter.adapter_up.weight", "output_adapter.adapter_up.bias"]),
        ("MOS", #"{"peft_type":"MOS","r":8,"lora_alpha":16,"shard_length":32,"shared_shards":64,"private_fraction":0.25,"target_modules":["query","value"]}"#, true,
         ["mos_private_A", "mos_private_B", "mos_index_A", "mos_index_B"]),
        ("LOREFT", #"{"peft_type":"LOREFT","r":4,"layers":[1,3,5],"positions":"f2+l2"}"#, false,
         ["loreft_rotation", "loreft_source.weight", "loreft_source.bias"]),
    ]

    func base() throws -> SafeTensorsFile {
        try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
    }

    /// Moves every trainable tensor (shared ones too) off its initialization, deterministically.
    static func perturb(_ adapter: NamedAdapter, by amount: Float) {
        for (k, p) in adapter.parameters.enumerated() {
            for i in 0..<p.count { p.pointer[i] += amount * Float((i * 7919 + k * 31) % 13 - 6) / 6 }
        }
    }

    @Test(arguments: configs.map(\.0))
    func mergeUnmergeAndRoundTrip(method: String) throws {
        guard let (_, json, mergeable, names) = Self.configs.first(where: { $0.0 == method }) else { return }
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let batch = try fixtureBatch(try base())
        let plain = try withNoGrad { try bert.forward(batch) }
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: method), seed: 7)
        Self.perturb(adapter, by: 0.05)
        let forward = { try withNoGrad { try bert.forward(batch) } }
        let unmerged = try forward()
        #expect(maxAbsDifference(unmerged, plain) > 1e-3, "\(method) does not change the output")
        if mergeable {
            try model.merge("default")
            let scale = max(1, unmerged.scalars.map(abs).max() ?? 1)
            let err = maxAbsDifference(try forward(), unmerged)
            #expect(err / scale <= 1e-5, "\(method): merged output differs by \(err) (scale \(scale))")
            try model.unmerge("default")
            #expect(maxAbsDifference(try forward(), unmerged) <= 1e-5)
        } else {
            #expect(throws: GraftError.self) { try model.merge("default") }
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-seed-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try Assets.loadMiniLM()
        try AdaptedModel(root: other).loadAdapter(directory: dir)
        #expect(maxAbsDifference(try withNoGrad { try other.forward(batch) }, unmerged) == 0, "\(method): reloaded output differs")
        let saved = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors").names
        let suffixes = Set(saved.filter { $0.hasPrefix("base_model.model.") }.map { $0.split(separator: ".").last.map(String.init) ?? "" })
        let expectedSuffixes = Set(names.map { $0.split(separator: ".").last.map(String.init) ?? "" })
        #expect(suffixes == expectedSuffixes, "\(method): saved \(saved.prefix(4))")
        for name in names {
            #expect(saved.contains { $0.hasSuffix("." + name) }, "\(method): no saved key ends in '\(name)'")
        }
        try model.deleteAdapter("default")
        #expect(maxAbsDifference(try forward(), plain) <= 1e-5)
    }

    /// Bottleneck adapters and LoReFT on the real MiniLM: sampled entries of every tensor against central
    /// differences of the encoder's output (the hooks sit inside BertLayer, so this checks them in place).
    @Test(arguments: ["SEQ_BN", "PAR_BN", "DOUBLE_SEQ_BN", "LOREFT"])
    func moduleGradients(type: String) throws {
        let json: String
        switch type {
        case "LOREFT": json = #"{"peft_type":"LOREFT","r":3,"layers":[1,4],"positions":"f1+l2"}"#
        case "PAR_BN": json = #"{"peft_type":"PAR_BN","reduction_factor":48,"mh_adapter":true,"non_linearity":"tanh","scaling":1.0}"#
        default: json = #"{"peft_type":"\#(type)","reduction_factor":48,"non_linearity":"tanh"}"#
        }
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("m", config: AdapterConfig(jsonText: json, source: type), seed: 3)
        Self.perturb(adapter, by: 0.05)
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 102]])
        var rng = GraftRNG(seed: 2)
        let w = Tensor.randomNormal([2, 5, 384], rng: &rng)
        func value() throws -> Double {
            let out = try withNoGrad { try bert.forward(batch) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(try bert.forward(batch) * w).backward()
        let check = try finiteDifferenceCheck(adapter.peftStateDict, step: 1e-2, samples: 12, report: 5e-3, value: value)
        #expect(check.missing.isEmpty, "\(type): no gradient for \(check.missing)")
        // Central differences of a float32 forward through six layers carry ~5e-3 of rounding and truncation
        // (DOUBLE_SEQ_BN measured 5.05e-3 on an AVX-512 CPU); a wrong gradient is off by order one.
        #expect(check.worst < 1e-2, "\(type): worst gradient error \(check.worst)")
    }

    /// LoReFT's R has orthonormal rows whatever its free parameters, and edits only the chosen positions.
    @Test func loreftRotationIsOrthonormalAndPositional() throws {
        var rng = GraftRNG(seed: 8)
        let v = Tensor.randomNormal([5, 16], rng: &rng)
        let r = withNoGrad { LoReFTLayer.orthonormalRows(v, rank: 5) }
        let rrt = withNoGrad { matmul(r, r, transposeB: true) }
        #expect(maxAbsDifference(rrt, Tensor(shape: [5, 5], values: (0..<25).map { $0 % 6 == 0 ? 1 : 0 })) < 1e-5)
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("m", config: AdapterConfig(jsonText: #"{"peft_type":"LOREFT","r":2,"layers":[5],"positions":"f1"}"#, source: "t"))
        let batch = try TokenBatch(sequences: [[101, 7592, 2088, 102]])
        let plain = try withNoGrad { try model.withAdaptersDisabled { try bert.forward(batch) } }
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, plain) < 1e-5, "W = R at init must be the identity")
        Self.perturb(adapter, by: 0.1)
        let out = try withNoGrad { try bert.forward(batch) }
        // Only layer 5 (the last), only token 0: the other tokens are untouched.
        #expect(maxAbsDifference(out.slice(dim: 1, 1..<4), plain.slice(dim: 1, 1..<4)) == 0)
        #expect(maxAbsDifference(out.slice(dim: 1, 0..<1), plain.slice(dim: 1, 0..<1)) > 1e-3)
        #expect(throws: GraftError.self) {
            try model.addAdapter("bad", config: AdapterConfig(jsonText: #"{"peft_type":"LOREFT","positions":"x3"}"#, source: "bad"))
        }
        for bad in [#"{"peft_type":"LOREFT","layers":"all"}"#, #"{"peft_type":"LOREFT","r":999}"#, #"{"peft_type":"SEQ_BN","reduction_factor":0}"#,
                    #"{"peft_type":"SEQ_BN","leave_out":3}"#, #"{"peft_type":"PAR_BN","non_linearity":"softsign"}"#,
                    #"{"peft_type":"ETHER","nb":5,"target_modules":["query"]}"#, #"{"peft_type":"ETHER","side":"left","target_modules":["query"]}"#,
                    #"{"peft_type":"MOS","shard_length":100,"target_modules":["query"]}"#] {
            #expect(throws: GraftError.self, "\(bad)") { try model.addAdapter("bad", config: AdapterConfig(jsonText: bad, source: "bad")) }
        }
    }

    /// Toy check over every trainable tensor, shared ones included (MoS's shard pools, VB-LoRA's bank).
    @Test(arguments: [
        #"{"peft_type":"MOS","r":2,"lora_alpha":4,"shard_length":4,"shared_shards":3,"private_fraction":0.25,"target_modules":["p","q"]}"#,
        #"{"peft_type":"VBLORA","r":2,"num_vectors":6,"vector_length":4,"topk":2,"target_modules":["p","q"]}"#,
    ])
    func sharedTensorGradients(json: String) throws {
        var rng = GraftRNG(seed: 11)
        let p = Linear(weight: Tensor.randomNormal([8, 8], std: 0.5, rng: &rng), bias: Tensor.randomNormal([8], rng: &rng))
        let q = Linear(weight: Tensor.randomNormal([4, 8], std: 0.5, rng: &rng), bias: nil)
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("p", p), ("q", q)]))
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: "toy"), seed: 3)
        for t in adapter.parameters { for i in 0..<t.count { t.pointer[i] += 0.3 * rng.nextNormal() } }
        let x = Tensor.randomNormal([3, 8], rng: &rng)
        let (wp, wq) = (Tensor.randomNormal([3, 8], rng: &rng), Tensor.randomNormal([3, 4], rng: &rng))
        func objective() -> Double {
            withNoGrad { Double(sum(p.forward(x) * wp).item) + Double(sum(q.forward(x) * wq).item) }
        }
        (sum(p.forward(x) * wp) + sum(q.forward(x) * wq)).backward()
        #expect(adapter.shared.allSatisfy { $0.tensor.grad != nil }, "shared tensors got no gradient")
        // A VB-LoRA logit within h of the k-th largest flips the top-k selection inside the step: the objective
        // has a kink there and central differences mean nothing, so such entries are skipped (and counted).
        let check = finiteDifferenceCheck(adapter.parameters.enumerated().map { ("tensor \($0.offset)", $0.element) },
                                          step: 1e-3, relativeStep: true, skipKinks: true, report: 5e-3, value: objective)
        #expect(check.missing.isEmpty, "no gradient for \(check.missing)")
        #expect(check.worst < 5e-3, "worst gradient error \(check.worst)")
        #expect(check.kinks <= 2, "\(check.kinks) entries sit on a top-k boundary")
    }

    /// VB-LoRA trains end to end: plain gradient steps on the logits and the shared bank lower a regression loss,
    /// and the top-k selection is recomputed from the current logits (it changes as they move).
    @Test func vbloraTopKTrainingLowersTheLoss() throws {
        var rng = GraftRNG(seed: 21)
        let p = Linear(weight: Tensor.randomNormal([8, 8], std: 0.5, rng: &rng), bias: nil)
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("p", p)]))
        let json = #"{"peft_type":"VBLORA","r":2,"num_vectors":8,"vector_length":4,"topk":2,"init_vector_bank_bound":0.5,"target_modules":["p"]}"#
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: "toy"), seed: 5)
        guard let layer = adapter.layers.first?.adapter as? VBLoRALayer else { Issue.record("no VB-LoRA layer"); return }
        let x = Tensor.randomNormal([16, 8], rng: &rng)
        let target = withNoGrad { p.forward(x) + linear(x, Tensor.randomNormal([8, 8], std: 0.3, rng: &rng)) }
        func topK() -> [[Int]] {
            let t = layer.logitsA, n = t.shape[2]
            return (0..<(t.count / n)).map { row in Array((0..<n).sorted { t.pointer[row * n + $0] > t.pointer[row * n + $1] }.prefix(2)) }
        }
        let initialSelection = topK()
        var losses: [Float] = []
        for _ in 0..<60 {
            for t in adapter.parameters { t.zeroGrad() }
            let diff = p.forward(x) - target
            let loss = mean(diff * diff)
            loss.backward()
            losses.append(loss.item)
            for t in adapter.parameters {
                guard let g = t.grad else { Issue.record("a \(t.shape) parameter got no gradient"); continue }
                for i in 0..<t.count { t.pointer[i] -= 0.5 * g.pointer[i] }
            }
        }
        #expect(adapter.parameters.count == 3, "logits A, logits B and the bank are trainable")
        #expect((losses.last ?? 1) < 0.7 * losses[0], "loss \(losses[0]) → \(losses.last ?? 0)")
        #expect(topK() != initialSelection, "the top-k selection never changed")
    }
}
