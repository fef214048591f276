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
}
