import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
@testable import GraftModels
import GraftTensor
import GraftTestSupport

/// SparseAdapter on MiniLM: SNIP keeps exactly ⌈(1 − sparsity) · size⌉ weights of each matrix — the largest
/// |w · ∂L/∂w| of the first backward, which the test recomputes from the gradients it sees — the Large-Sparse
/// setting keeps as many weights as the dense adapter at the same reduction factor, gradients match finite
/// differences after pruning, and save → load restores weights and masks.
@Suite struct SparseAdapterTests {
    static func batch() throws -> TokenBatch { try TokenBatch(sequences: [[101, 7592, 2088, 2003, 102], [101, 2023, 2001, 102]]) }

    @Test func snipKeepsItsShareAndLargeSparseMatchesTheDenseBudget() throws {
        for (largeSparse, bottleneck) in [(false, 24), (true, 40)] {
            let bert = try Assets.loadMiniLM()
            let model = AdaptedModel(root: bert)
            let json = #"{"peft_type":"SPARSE_ADAPTER","reduction_factor":16,"sparsity":0.4,"large_sparse":\#(largeSparse),"variant":"double_seq_bn"}"#
            let adapter = try model.addAdapter("s", config: AdapterConfig(jsonText: json, source: "sparse"), seed: 2)
            let layers = adapter.modules.compactMap { $0.adapter as? SparseAdapterLayer }
            #expect(layers.count == 6)
            model.setTraining(true)
            sum(try bert.forward(try Self.batch())).backward()
            model.setTraining(false)
            // SNIP scores from the gradients before pruning clears them.
            var expected: [[Int]] = []
            for layer in layers {
                for (_, w) in layer.prunable {
                    #expect(w.shape.contains(bottleneck), "bottleneck \(w.shape), expected \(bottleneck)")
                    let g = try #require(w.grad)
                    let scores = (0..<w.count).map { abs(w.pointer[$0] * g.pointer[$0]) }
                    let keep = Int((0.6 * Double(w.count)).rounded(.up))
                    expected.append(Array(scores.indices.sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }.prefix(keep)).sorted())
                }
            }
            adapter.afterBackward(step: 0)
            var kept = 0, index = 0
            for layer in layers {
                let masks = try #require(layer.masks)
                for (name, w) in layer.prunable {
                    let mask = try #require(masks[name])
                    let on = (0..<w.count).filter { mask.pointer[$0] == 1 }
                    #expect(on == expected[index], "\(name): kept a different set than the largest |w·g|")
                    #expect((0..<w.count).allSatisfy { mask.pointer[$0] == 1 || (w.pointer[$0] == 0 && (w.grad?.pointer[$0] ?? 0) == 0) })
                    kept += on.count
                    index += 1
                }
            }
            // Large-Sparse: 40 = ⌊384 / (16 · 0.6)⌋ wide at 40% sparsity keeps about the dense 24-wide adapter's weights.
            let dense = 6 * 2 * 2 * 24 * 384
            if largeSparse {
                #expect(abs(Double(kept - dense)) / Double(dense) < 0.01, "Large-Sparse kept \(kept), dense budget \(dense)")
            } else {
                #expect(kept == 6 * 2 * 2 * Int((0.6 * 24 * 384).rounded(.up)))
            }
        }
    }

    /// tanh rather than relu: finite differences across a relu kink would measure the kink, not the gradient.
    @Test func gradientsAfterPruningAndSaveLoad() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: #"{"peft_type":"SPARSE_ADAPTER","reduction_factor":64,"sparsity":0.5,"variant":"par_bn","non_linearity":"tanh"}"#, source: "sparse"), seed: 4)
        model.setTraining(true)
        sum(try bert.forward(try Self.batch())).backward()
        model.setTraining(false)
        adapter.afterBackward(step: 0)
        var rng = GraftRNG(seed: 3)
        for (_, p) in adapter.peftStateDict {
            p.grad = nil
            for i in 0..<p.count where p.pointer[i] != 0 { p.pointer[i] += 0.05 * rng.nextNormal() }
        }
        let w = Tensor.randomNormal(try withNoGrad { try bert.forward(try Self.batch()) }.shape, rng: &rng)
        func objective() throws -> Double {
            zip(try withNoGrad { try bert.forward(try Self.batch()) }.scalars, w.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        sum(try bert.forward(try Self.batch()) * w).backward()
        let check = try finiteDifferenceCheck(adapter.peftStateDict, step: 1e-2, relativeStep: true, samples: 12, value: objective)
        #expect(check.missing.isEmpty, "no gradient for \(check.missing)")
        // Central differences at a 1e-2 relative step through float32 forwards: 4.9e-3 to 5.1e-3 depending on the
        // CPU's GEMM kernels. A wrong gradient (a pruned weight's, a missing mask) errs by order 1.
        #expect(check.worst < 1e-2, "worst gradient error \(check.worst)")
        for layer in adapter.modules.compactMap({ $0.adapter as? SparseAdapterLayer }) {
            for (name, p) in layer.prunable {
                let mask = try #require(layer.masks?[name])
                #expect((0..<p.count).allSatisfy { mask.pointer[$0] == 1 || (p.grad?.pointer[$0] ?? 0) == 0 }, "\(name): a pruned weight got a gradient")
            }
        }
        let out = try withNoGrad { try bert.forward(try Self.batch()) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("graft-sparse-adapter-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try model.saveAdapter("default", directory: dir)
        let other = try Assets.loadMiniLM()
        let loaded = try AdaptedModel(root: other).loadAdapter(directory: dir)
        #expect(maxAbsDifference(try withNoGrad { try other.forward(try Self.batch()) }, out) <= 1e-6)
        #expect(loaded.modules.compactMap { ($0.adapter as? SparseAdapterLayer)?.masks }.count == 6)
    }
}
