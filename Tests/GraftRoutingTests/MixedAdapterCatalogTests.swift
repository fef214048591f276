import Foundation
import Testing
@testable import Graft
import GraftAdapters
@testable import GraftRouting
import GraftTestSupport

/// Every Linear-layer method in the catalog joins mixed-adapter batches: a batch whose rows use this method, a
/// LoRA adapter and the base gives each row what it gives alone. Methods whose rows depend on the batch (Lily's
/// batch-averaged router, capacity-limited expert mixtures) run one sequence at a time, and give each row what it
/// gives alone padded to the batch's length (their router sees the padding, as PEFT's does).
@Suite(.serialized) struct MixedAdapterCatalogTests {
    @Test(arguments: AdapterMethodTable.all.linear.keys.sorted())
    func linearMethodMixesWithLoRAAndBase(peftType: String) throws {
        let s = try GraftSession(path: try Assets.require(Assets.minilm), task: .base)
        guard let factory = AdapterMethodTable.all.linear[peftType] else { return }
        var config = factory.exampleConfig(targets: ["query", "value"])
        config["peft_type"] = peftType
        let experts = FileManager.default.temporaryDirectory.appendingPathComponent("graft-mixed-xlora-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: experts) }
        if peftType == XLoRAFactory.peftType {
            // X-LoRA mixes LoRA experts read from their directories: three made on this model.
            config["adapters"] = try XLoRATests.miniLMExperts(s.adapted.root, dir: experts)
        }
        let json = String(decoding: try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys]), as: UTF8.self)
        try s.addAdapter(name: "method", configJSON: json, seed: 10)
        try s.addAdapter(name: "lora", configJSON: #"{"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"], "init_lora_weights": false}"#, seed: 11)
        // Methods that choose their trainable entries while training (ID³'s unmasking, SPT's and TR-PTS's
        // allocations) choose them now, from no gradient (the lowest positions), so their entries take part.
        for layer in try s.adapted.adapter("method").layers { (layer.adapter as? ID3Layer)?.unmask(upTo: Int.max) }
        for hook in try s.adapted.adapter("method").trainingHooks {
            (hook as? SPTAllocator)?.allocate()
            (hook as? TRPTSAllocator)?.allocate()
        }
        // Every trainable tensor, shared ones included, moves off its (often identity) initial value.
        var rng = GraftRNG(seed: 100)
        for name in ["method", "lora"] {
            for t in try s.adapted.adapter(name).parameters {
                for i in 0..<t.count { t.pointer[i] += 0.05 * (2 * rng.nextUniform() - 1) }
            }
        }
        let coupled = try s.adapted.adapter("method").layers.contains { $0.adapter.couplesRows }
        #expect(coupled == ["LILY", "LORA_MOE"].contains(peftType), "\(peftType): couplesRows = \(coupled)")

        let ids: [Int32] = [0, 1, -1, 0, 1]
        let rows = MixedAdapterBatchTests.rows(ids.count, lengths: [7, 12, 5, 9, 11], vocab: 30522, seed: 4, first: 101)
        let stride = rows.map(\.count).max() ?? 0
        let batch = try s.tokenBatch(ids: rows.flatMap { $0 + [Int32](repeating: 0, count: stride - $0.count) },
                                     lengths: rows.map(\.count), batch: rows.count, stride: stride)
        let mixed = try s.forward(batch: batch, adapterIds: ids, output: .hidden)
        let hidden = mixed.count / (rows.count * stride)
        var worst: Float = 0, effect: Float = 0
        for (r, row) in rows.enumerated() {
            // Alone: the row by itself (padded to the batch's length for batch-coupled methods).
            let width = coupled ? stride : row.count
            let alone = try s.tokenBatch(ids: row + [Int32](repeating: 0, count: width - row.count),
                                         lengths: [row.count], batch: 1, stride: width)
            try MixedAdapterBatchTests.use(s, ids[r])
            let expected = try s.forward(batch: alone, adapterIds: nil, output: .hidden)
            try MixedAdapterBatchTests.use(s, -1)
            let base = try s.forward(batch: alone, adapterIds: nil, output: .hidden)
            s.adapted.setAdaptersDisabled(false)
            for i in 0..<(row.count * hidden) {
                worst = worse(worst, abs(expected[i] - mixed[r * stride * hidden + i]))
                if ids[r] == 0 { effect = worse(effect, abs(expected[i] - base[i])) }
            }
        }
        print("\(peftType) + LoRA + base in one batch vs each row alone: max |Δ| = \(worst) (the method moves its rows by \(effect))")
        #expect(effect > 1e-3, "\(peftType) does not change its rows (max |Δ| vs base \(effect)), so the comparison shows nothing")
        #expect(worst <= 1e-5, "\(peftType): a mixed row differs from the row alone by \(worst)")
    }
}
