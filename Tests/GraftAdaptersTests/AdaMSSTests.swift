import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// AdaMSS's initialisation as PEFT draws it: PyTorch's seeded `svd_lowrank` and scikit-learn's K-means with NumPy's
/// legacy generator, checked against what PEFT 0.21.2 (scikit-learn 1.9.1) saved in the MiniLM fixture.
@Suite(.serialized) struct AdaMSSInitTests {
    /// `np.random.RandomState(123456789)`: `rand(3)`, and the centres `choice(384, 5, replace=False, p=uniform)`
    /// gives scikit-learn's random K-means initialisation (both printed by NumPy 2.4).
    @Test func numpyLegacyGeneratorDrawsAsNumPy() {
        var rng = NumpyRandomState(seed: 123_456_789)
        let draws = (0..<3).map { _ in rng.nextDouble() }
        let expected = [0.53283302, 0.5341366, 0.50955304]
        for (d, e) in zip(draws, expected) { #expect(abs(d - e) < 1e-8, "rand: \(draws)") }
        var again = NumpyRandomState(seed: 123_456_789)
        let p = [Double](repeating: Double(Float(1) / Float(384)), count: 384)
        #expect(again.choiceWithoutReplacement(p: p, size: 5) == [204, 205, 195, 274, 98])
    }

    /// A fresh adapter with the fixture's config groups every layer's output rows into PEFT's subspaces (the sizes
    /// of PEFT's `adamss_B.i`), its projection is PEFT's `adamss_newB` up to each row's sign, and with B = 0 it
    /// leaves the model's output unchanged.
    @Test func freshAdapterReproducesPEFTsSubspaces() throws {
        let dir = Assets.fixture("peft-minilm-wave2/adamss")
        let text = try String(contentsOfFile: dir + "/adapter_config.json", encoding: .utf8)
        let file = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let bert = try Assets.loadMiniLM()
        let batch = try fixtureBatch(try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm-wave2/base_expected.safetensors")))
        let base = try withNoGrad { try bert.forward(batch) }
        let adapter = try AdaptedModel(root: bert).addAdapter("a", config: AdapterConfig(jsonText: text, source: "adamss"))
        #expect(adapter.layers.count == 18)
        var worstProjection: Float = 0
        for (path, _, method) in adapter.layers {
            guard let layer = method as? AdaMSSLayer else { Issue.record("\(path) is not AdaMSS"); continue }
            let key = "base_model.model.\(path)"
            let sizes = try (0..<layer.subspaceCount).map { try file.tensor("\(key).adamss_B.\($0)").shape[0] }
            #expect(layer.groups.map(\.count) == sizes, "\(path): subspace sizes \(layer.groups.map(\.count)) vs PEFT's \(sizes)")
            let saved = try file.tensor("\(key).adamss_newB")
            let cols = saved.shape[1]
            for row in 0..<saved.shape[0] {
                var same: Float = 0, flipped: Float = 0
                for j in 0..<cols {
                    let (x, y) = (layer.projection.pointer[row * cols + j], saved.pointer[row * cols + j])
                    same = max(same, abs(x - y))
                    flipped = max(flipped, abs(x + y))
                }
                worstProjection = max(worstProjection, min(same, flipped))
            }
        }
        print("AdaMSS fresh projection vs PEFT's adamss_newB (up to sign): max-abs \(worstProjection)")
        #expect(worstProjection < 1e-4)
        let out = try withNoGrad { try bert.forward(batch) }
        #expect(maxAbsDifference(out, base) < 1e-5, "B = 0 is the base model")
    }
}
