import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// IncreLoRA and TriAdaptLoRA outside training: gradients of partly grown layers against central differences,
/// growth leaving the function as the paper defines it, merge / unmerge, and the save as PEFT LoRA with a
/// `rank_pattern` loaded back through Graft's LoRA path.
@Suite struct AdaptiveRankTests {
    static let configs: [(String, String)] = [
        ("IncreLoRA", #"{"peft_type":"INCRELORA","init_r":1,"target_r":2,"max_r":3,"lora_alpha":4,"target_modules":["proj"]}"#),
        ("TriAdaptLoRA", #"{"peft_type":"TRIADAPTLORA","init_r":1,"target_r":2,"max_r":3,"lora_alpha":4,"target_modules":["proj"]}"#),
    ]

    static func batch() throws -> TokenBatch { try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 102]]) }

    static func relative(_ a: Tensor, _ b: Tensor) -> Float { maxAbsDifference(a, b) / max(1, b.scalars.map(abs).max() ?? 1) }

    /// Two of three ranks active: the active entries' gradients match central differences, the inactive ones are
    /// exactly zero (and so is their numeric slope).
    @Test(arguments: configs.map(\.0))
    func gradientsMatchFiniteDifferences(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        var rng = GraftRNG(seed: 11)
        let (inF, outF, rows) = (8, 6, 3)
        let proj = Linear(weight: Tensor.randomNormal([outF, inF], std: 0.5, rng: &rng), bias: Tensor.randomNormal([outF], rng: &rng))
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        let layer = try #require(adapter.layers.first?.adapter as? any GrowingRankLayer)
        layer.grow(by: 1)
        #expect(layer.activeRank == 2 && layer.capacity == 3)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        let x = Tensor.randomNormal([rows, inF], rng: &rng).requiringGrad()
        let w = Tensor.randomNormal([rows, outF], rng: &rng)
        func objective() -> Double {
            let out = withNoGrad { proj.forward(x.detached()) }
            return zip(out.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(proj.forward(x) * w).backward()
        let check = finiteDifferenceCheck(adapter.peftStateDict + [("input", x)], step: 1e-2, relativeStep: true, value: objective)
        #expect(check.missing.isEmpty, "\(method): no gradient for \(check.missing)")
        #expect(check.worst < 2e-3, "\(method): worst gradient error \(check.worst)")
        // The third rank is off: no gradient reaches its row of A.
        for (key, p) in adapter.peftStateDict where key.hasSuffix("lora_A") {
            let g = try #require(p.grad)
            let inactive = (2 * inF)..<(3 * inF)
            #expect(inactive.allSatisfy { g.pointer[$0] == 0 }, "\(method): gradient on an inactive rank")
        }
    }

    /// IncreLoRA: a triplet enters with E = 0, so growing leaves ΔW unchanged. TriAdaptLoRA: new core entries
    /// enter at zero and the scaling α/r becomes α/r', so ΔW is multiplied by r/r'.
    @Test(arguments: configs.map(\.0))
    func growthChangesTheUpdateAsDefined(method: String) throws {
        let json = Self.configs.first { $0.0 == method }?.1 ?? ""
        var rng = GraftRNG(seed: 4)
        let proj = Linear(weight: Tensor.randomNormal([6, 8], rng: &rng), bias: nil)
        let model = AdaptedModel(root: ModuleList(typeName: "Toy", [("proj", proj)]))
        let adapter = try model.addAdapter("a", config: AdapterConfig(jsonText: json, source: method), seed: 3)
        let layer = try #require(adapter.layers.first?.adapter as? any GrowingRankLayer)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.3 * rng.nextNormal() } }
        if let incre = layer as? IncreLoRALayer { for i in 1..<incre.capacity { incre.loraE.pointer[i] = 0 } }
        if let tri = layer as? TriAdaptLoRALayer {
            for i in 0..<tri.capacity { for j in 0..<tri.capacity where i >= 1 || j >= 1 { tri.lower.pointer[i * 3 + j] = 0; tri.upper.pointer[i * 3 + j] = 0 } }
        }
        let before = try #require(layer.deltaWeight(base: proj))
        #expect(before.scalars.contains { $0 != 0 })
        layer.grow(by: 1)
        let after = try #require(layer.deltaWeight(base: proj))
        let factor: Float = layer is TriAdaptLoRALayer ? (1 + 1e-5) / (2 + 1e-5) : 1
        #expect(maxAbsDifference(after, before * factor) < 1e-6, "\(method)")
        layer.grow(by: 5)
        #expect(layer.activeRank == layer.capacity, "growth stops at max_r")
    }

    /// Unequal ranks on MiniLM: merge reproduces the output, unmerge restores W, and the saved adapter is a PEFT
    /// LoRA with `rank_pattern` that Graft's LoRA path loads to the same output.
    @Test(arguments: ["INCRELORA", "TRIADAPTLORA"])
    func mergeAndSaveAsLoRAWithRankPattern(type: String) throws {
        let bert = try Assets.loadMiniLM()
        let weights: [(String, Tensor)] = bert.namedModules().compactMap { e in (e.module as? Linear).map { (e.name, $0.weight.copy()) } }
        let model = AdaptedModel(root: bert)
        let json: [String: Any] = ["peft_type": type, "init_r": 1, "target_r": 3, "max_r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]]
        let adapter = try model.addAdapter("default", config: AdapterConfig(json: json, source: type), seed: 7)
        let grown = adapter.layers.compactMap { $0.adapter as? any GrowingRankLayer }
        for (i, layer) in grown.enumerated() { layer.grow(by: i % 4) }
        var rng = GraftRNG(seed: 5)
        for (_, p) in adapter.peftStateDict { for i in 0..<p.count { p.pointer[i] += 0.1 * rng.nextNormal() } }
        let unmerged = try withNoGrad { try bert.forward(try Self.batch()) }
        let base = try withNoGrad { try model.withAdaptersDisabled { try bert.forward(try Self.batch()) } }
        #expect(Self.relative(unmerged, base) > 1e-4, "the adapter changes the output")
        try model.merge("default")
        #expect(Self.relative(try withNoGrad { try bert.forward(try Self.batch()) }, unmerged) <= 1e-5)
        try model.unmerge("default")
        for (path, w) in weights {
            guard let lin = bert.namedModules().first(where: { $0.name == path })?.module as? Linear else { continue }
            #expect(maxAbsDifference(lin.weight, w) < 1e-6, "\(path) after unmerge")
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-rank-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let saved = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any]
        #expect(saved?["peft_type"] as? String == "LORA")
        let pattern = try #require(saved?["rank_pattern"] as? [String: Int])
        #expect(pattern == Dictionary(uniqueKeysWithValues: zip(adapter.layers.map(\.path), grown.map(\.activeRank))))
        let other = try Assets.loadMiniLM()
        let loaded = try AdaptedModel(root: other).loadAdapter(directory: dir)
        #expect(loaded.config.peftType == "LORA")
        for ((path, _, l), g) in zip(loaded.layers, grown) {
            #expect((l as? LoRALayer)?.rank == g.activeRank, "\(path)")
        }
        let reloaded = try withNoGrad { try other.forward(try Self.batch()) }
        #expect(Self.relative(reloaded, unmerged) <= 1e-5, "\(type) reloaded: \(Self.relative(reloaded, unmerged))")
    }

    /// Bad configs fail naming the key or the budget.
    @Test func configErrorsNameTheProblem() throws {
        var rng = GraftRNG(seed: 2)
        let root = ModuleList(typeName: "Toy", [("proj", Linear(weight: Tensor.randomNormal([4, 4], rng: &rng), bias: nil))])
        for (json, key) in [(#"{"peft_type":"INCRELORA","init_r":0,"target_modules":["proj"]}"#, "init_r"),
                            (#"{"peft_type":"INCRELORA","init_r":2,"target_r":4,"max_r":3,"target_modules":["proj"]}"#, "budget 4"),
                            (#"{"peft_type":"INCRELORA","deltaT":0,"target_modules":["proj"]}"#, "deltaT"),
                            (#"{"peft_type":"INCRELORA","beta1":1.5,"target_modules":["proj"]}"#, "beta1"),
                            (#"{"peft_type":"TRIADAPTLORA","rank_growth_model":"cubic","target_modules":["proj"]}"#, "rank_growth_model"),
                            (#"{"peft_type":"TRIADAPTLORA","incre_rank_num":0,"target_modules":["proj"]}"#, "incre_rank_num"),
                            (#"{"peft_type":"TRIADAPTLORA","init_r":3,"target_r":2,"target_modules":["proj"]}"#, "init_r")] {
            do {
                try AdaptedModel(root: root).addAdapter("x", config: AdapterConfig(jsonText: json, source: "cfg"))
                Issue.record("accepted \(json)")
            } catch let e as GraftError {
                #expect(e.message.contains(key), "\(e.message)")
            }
        }
    }
}
