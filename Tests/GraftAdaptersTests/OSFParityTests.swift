import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftTensor
import GraftTestSupport

/// OSF against PEFT 0.21.2 on the vendored fixtures (`scripts/fixtures/peft-minilm-osf.py`): PEFT's own SVD split
/// of the shared fixture's effective_rank 8 on one layer, and a small trainable minor subspace on every query, key,
/// value and intermediate.dense (non-square, where U_high projects the gradient). Loads, reproduces the output at the
/// catalog's tolerance, counts PEFT's trainable parameters, saves PEFT's keys and shapes, merges and unmerges.
@Suite(.serialized) struct OSFParityTests {
    static let fixtures = ["osf_top8_one_layer", "osf_minor8"]

    func manifestEntry(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Assets.fixture("peft-minilm-osf/manifest.json")))
        let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        return ((manifest?["methods"] as? [String: Any])?[name] as? [String: Any]) ?? [:]
    }

    @Test(arguments: fixtures)
    func outputMatchesPEFT(name: String) throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let dir = Assets.fixture("peft-minilm-osf/\(name)")
        let adapter = try model.loadAdapter(directory: dir)
        let batch = try fixtureBatch(try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors")))
        let expected = try SafeTensorsFile(contentsOf: dir + "/expected.safetensors").tensor("last_hidden_state")
        let out = try withNoGrad { try bert.forward(batch) }
        let err = maxAbsDifference(out, expected)
        let change = (try manifestEntry(name)["max_abs_change_vs_base"] as? Double) ?? .infinity
        // The catalog's tolerance: 1e-4 max-abs, or 1e-5 of the output's scale where the adapter moves it by more than 10.
        let tolerance: Float = change > 10 ? max(1e-4, 1e-5 * worstOf(expected.scalars.map(abs), empty: 0)) : 1e-4
        print("osf \(name): max-abs error vs PEFT \(err) (tolerance \(tolerance), output change \(change)), \(adapter.layers.count) layers, \(adapter.parameterCount) trainable")
        #expect(err <= tolerance, "\(name): max-abs error \(err)")
        #expect(adapter.parameterCount == (try manifestEntry(name)["trainable"] as? Int))
        let plain = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(batch) } }
        #expect(maxAbsDifference(plain, expected) > 0.1, "the fixture's adapter changes the output")

        // PEFT's keys and shapes on save.
        let saved = FileManager.default.temporaryDirectory.appendingPathComponent("graft-osf-\(getpid())-\(name)").path
        defer { try? FileManager.default.removeItem(atPath: saved) }
        try model.saveAdapter("default", directory: saved)
        let peft = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        let ours = try SafeTensorsFile(contentsOf: saved + "/adapter_model.safetensors")
        #expect(Set(ours.names) == Set(peft.names))
        for key in peft.names { #expect(ours.info(key)?.shape == peft.info(key)?.shape, "\(key)") }

        // Merge folds the change into the weights; unmerge restores the base.
        try model.merge("default")
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, out) <= 1e-4)
        try model.unmerge("default")
        model.setAdaptersDisabled(true)
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, plain) <= 1e-5)
    }
}
