import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// PEFT's Arrow router (`arrow_config`, made by `create_arrow_model`) loaded from PEFT's files over the task and
/// general LoRA adapters it names: the output must be PEFT's (scripts/fixtures/peft-arrow.py), with and without
/// GenKnowSub, for top-1, top-2 and top-3 routing at three temperatures.
@Suite(.serialized) struct ArrowConfigTests {
    let dir = Assets.fixture("peft-arrow")

    /// MiniLM with PEFT's three task adapters (task_<i>) and two general ones (gks_<i>) loaded, then the case's router.
    func routed(_ name: String) throws -> (BertModel, AdaptedModel) {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        for i in 0..<3 { _ = try model.loadAdapter(directory: dir + "/task/\(i)", name: "task_\(i)") }
        for i in 0..<2 { _ = try model.loadAdapter(directory: dir + "/general/\(i)", name: "gks_\(i)") }
        _ = try model.loadAdapter(directory: dir + "/\(name)/arrow_router", name: "arrow_router")
        try model.setActiveAdapter("arrow_router")
        return (bert, model)
    }

    @Test(arguments: ["top2", "top1_gks", "top3_gks_cold"])
    func routerMatchesPEFT(name: String) throws {
        let (bert, _) = try routed(name)
        let inputs = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors"))
        let out = try withNoGrad { try bert.forward(try fixtureBatch(inputs)) }
        let expected = try SafeTensorsFile(contentsOf: dir + "/\(name)/expected.safetensors").tensor("last_hidden_state")
        let base = try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors")).tensor("last_hidden_state")
        let d = maxAbsDifference(out, expected), moved = maxAbsDifference(expected, base)
        print("Arrow \(name): max |Graft − PEFT| = \(d) (the router moves the output by \(moved))")
        #expect(d <= 1e-4)
        #expect(moved > 1e-2)
    }

    @Test func genKnowSubSubtractsTheGeneralMeanFromEveryTaskAdapter() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        for i in 0..<3 { _ = try model.loadAdapter(directory: dir + "/task/\(i)", name: "task_\(i)") }
        for i in 0..<2 { _ = try model.loadAdapter(directory: dir + "/general/\(i)", name: "gks_\(i)") }
        let path = "encoder.layer.0.attention.self.query"
        func lora(_ name: String) throws -> LoRALayer {
            let layer = try model.adapter(name).layers.first { $0.0 == path }?.2
            return try #require(layer as? LoRALayer)
        }
        let before = try lora("task_1").loraA.scalars
        let g0 = try lora("gks_0").loraA.scalars, g1 = try lora("gks_1").loraA.scalars
        _ = try model.loadAdapter(directory: dir + "/top1_gks/arrow_router", name: "arrow_router")
        let after = try lora("task_1").loraA.scalars
        var gaps: [Float] = []
        for i in 0..<before.count {
            let mean: Float = (g0[i] + g1[i]) / 2
            gaps.append(abs(after[i] - (before[i] - mean)))
        }
        let worst = worstOf(gaps, empty: Float(0))
        #expect(worst <= 1e-6)
    }

    @Test func missingAdaptersAndBadOptionsAreNamed() throws {
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        _ = try model.loadAdapter(directory: dir + "/task/0", name: "task_0")
        let config = #"{"peft_type":"LORA","r":4,"target_modules":["query","value"],"arrow_config":{"task_adapter_names":["task_0","task_9"],"top_k":1}}"#
        do {
            _ = try model.addAdapter("arrow_router", config: AdapterConfig(jsonText: config, source: "arrow"))
            Issue.record("a router naming a missing adapter should throw")
        } catch let e as GraftError {
            #expect(e.message.contains("'task_9'"), "\(e.message)")
        }
        #expect(model.adapters.map(\.name) == ["task_0"])
        for bad in [#""top_k":0"#, #""router_temperature":-1"#, #""colour":1"#, #""use_gks":true"#] {
            let json = #"{"peft_type":"LORA","r":4,"target_modules":["query"],"arrow_config":{"task_adapter_names":["task_0"],"#
                + bad + "}}"
            #expect(throws: GraftError.self) { try model.addAdapter("r", config: AdapterConfig(jsonText: json, source: "arrow")) }
        }
    }
}
