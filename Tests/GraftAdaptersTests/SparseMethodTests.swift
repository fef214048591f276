import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// The selective and sparse methods (BitFit, SpIEL, NeuroAda, DSEE, ID³, SPT; SparseAdapter in SparseAdapterTests): each one's defining invariant, finite-difference
/// gradients, merge / unmerge, and a save → load round trip in PEFT's file layout on MiniLM.
@Suite struct SparseMethodTests {
    static let configs: [(String, String)] = [
        ("BitFit", #"{"peft_type":"BITFIT","target_modules":["query","value"]}"#),
        ("SpIEL", #"{"peft_type":"SPIEL","density":0.01,"target_modules":["query","value"]}"#),
        ("NeuroAda", #"{"peft_type":"NEUROADA","k":2,"target_modules":["query","value"]}"#),
        ("DSEE", #"{"peft_type":"DSEE","r":4,"lora_alpha":8,"num_sparse":32,"prune_ratio":0.05,"target_modules":["query","value"]}"#),
        ("ID3", #"{"peft_type":"ID3","density":0.01,"unmask_steps":4,"target_modules":["query","value"]}"#),
        ("SPT", #"{"peft_type":"SPT","budget_density":0.01,"lora_threshold":0.012,"r":4,"warmup_steps":1,"target_modules":["query","value"]}"#),
    ]

    static func batch() throws -> TokenBatch { try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 102]]) }

    /// Relative max-abs difference (NaN when either side has one).
    static func relative(_ a: Tensor, _ b: Tensor) -> Float { maxAbsDifference(a, b) / max(1, b.scalars.map(abs).max() ?? 1) }

    /// A toy model with one 6×8 Linear (with or without bias).
    static func toy(bias: Bool, seed: UInt64 = 11) -> (ModuleList, Linear) {
        var rng = GraftRNG(seed: seed)
        let proj = Linear(weight: Tensor.randomNormal([6, 8], std: 0.5, rng: &rng), bias: bias ? Tensor.randomNormal([6], rng: &rng) : nil)
        return (ModuleList(typeName: "Toy", [("proj", proj)]), proj)
    }

    @Test(arguments: [#"{"peft_type":"BITFIT","target_modules":["proj"]}"#,
                      #"{"peft_type":"SPIEL","density":0.25,"target_modules":["proj"]}"#,
                      #"{"peft_type":"NEUROADA","k":3,"target_modules":["proj"]}"#,
                      #"{"peft_type":"DSEE","r":2,"lora_alpha":4,"num_sparse":5,"prune_ratio":0.25,"target_modules":["proj"]}"#,
                      #"{"peft_type":"ID3","density":0.25,"unmask_steps":2,"target_modules":["proj"]}"#])
    func gradientsMatchFiniteDifferences(json: String) throws {
        for bias in [true, false] {
            let (root, proj) = Self.toy(bias: bias)
            let adapter = try AdaptedModel(root: root).addAdapter("a", config: AdapterConfig(jsonText: json, source: "grad"), seed: 3)
            var rng = GraftRNG(seed: 5)
            for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
            // DSEE pruned: the gradients then flow through the gathered (W + ΔW) entries it subtracts too.
            for l in adapter.layers { (l.adapter as? DSEELayer)?.prune() }
            // ID³ half unmasked: the live entries get gradients, the masked ones none.
            for l in adapter.layers { (l.adapter as? ID3Layer)?.unmask(upTo: 6) }
            let x = Tensor.randomNormal([3, 8], rng: &rng).requiringGrad()
            let w = Tensor.randomNormal([3, 6], rng: &rng)
            func objective() -> Double {
                zip(withNoGrad { proj.forward(x.detached()) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
            }
            sum(proj.forward(x) * w).backward()
            let check = finiteDifferenceCheck(adapter.peftStateDict + [("input", x)], step: 1e-2, relativeStep: true, value: objective)
            #expect(check.missing.isEmpty, "\(json): no gradient for \(check.missing)")
            #expect(check.worst < 2e-3, "\(json) bias \(bias): worst gradient error \(check.worst)")
        }
    }

    /// A fresh adapter keeps the base output; perturbed, merging reproduces the unmerged output, unmerging
    /// restores the base weights, and save → load into a fresh model reproduces it, indices saved as integers.
    @Test(arguments: configs.map(\.0))
    func mergeUnmergeAndSaveLoad(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        let bert = try Assets.loadMiniLM()
        let base = try withNoGrad { try bert.forward(try Self.batch()) }
        let originals: [(String, Tensor, Tensor?)] = bert.namedModules().compactMap { entry in
            (entry.module as? Linear).map { (entry.name, $0.weight.copy(), $0.bias?.copy()) }
        }
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: method), seed: 7)
        #expect(Self.relative(try withNoGrad { try bert.forward(try Self.batch()) }, base) <= 1e-6, "\(method) fresh")
        if method == "SPT" {
            // Settle SPT from one warm-up gradient, as its training hook would.
            model.setTraining(true)
            sum(try bert.forward(try Self.batch())).backward()
            model.setTraining(false)
            adapter.afterBackward(step: 0)
            for hook in adapter.trainingHooks { hook.didUpdate(step: 1, totalSteps: 2) }
            print("SPT modes on MiniLM: \(adapter.layers.compactMap { ($0.adapter as? SPTLayer)?.mode })")
            for (_, p) in adapter.peftStateDict { p.grad = nil }
        }
        var rng = GraftRNG(seed: 5)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.02 * rng.nextNormal() } }
        for l in adapter.layers { (l.adapter as? DSEELayer)?.prune() }
        for l in adapter.layers {
            guard let id3 = l.adapter as? ID3Layer else { continue }
            id3.unmask(upTo: id3.budget / 2)
            // Masked entries are outside the product: keep them at 0 as training would.
            for i in id3.unmaskedCount..<id3.budget { id3.values.pointer[i] = 0 }
        }
        let unmerged = try withNoGrad { try bert.forward(try Self.batch()) }
        #expect(Self.relative(unmerged, base) > 1e-4, "\(method): the perturbed adapter changes nothing")
        try model.merge("default")
        let merged = try withNoGrad { try bert.forward(try Self.batch()) }
        #expect(Self.relative(merged, unmerged) <= 1e-5, "\(method) merged: \(Self.relative(merged, unmerged))")
        try model.unmerge("default")
        for (path, w, b) in originals {
            guard let lin = bert.namedModules().first(where: { $0.name == path })?.module as? Linear else { continue }
            #expect(maxAbsDifference(lin.weight, w) < 1e-6, "\(method) \(path) weight after unmerge")
            if let b, let lb = lin.bias { #expect(maxAbsDifference(lb, b) < 1e-6, "\(method) \(path) bias after unmerge") }
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-sparse-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let file = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        #expect(config?["peft_type"] as? String == adapter.config.peftType)
        if method != "BitFit" {
            let indexKeys = file.names.filter { $0.hasSuffix("_indices") }
            #expect(indexKeys.count == adapter.layers.count * (method == "DSEE" ? 2 : 1), "\(method): \(indexKeys)")
            for key in file.names where key.hasSuffix("_mode") { #expect(file.info(key)?.dtype == .i32, "\(key) is not int32") }
            for key in indexKeys { #expect(file.info(key)?.dtype == .i32, "\(method) \(key) is not int32") }
        }
        let other = try Assets.loadMiniLM()
        try AdaptedModel(root: other).loadAdapter(directory: dir)
        let reloaded = try withNoGrad { try other.forward(try Self.batch()) }
        #expect(Self.relative(reloaded, unmerged) <= 1e-6, "\(method) reloaded: \(Self.relative(reloaded, unmerged))")
    }
}
