import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// LoRA-GA (`init_lora_weights: "lora_ga"`): Graft's initialisation from its own weight gradients against PEFT's
/// `preprocess_loraga` on the same loss (scripts/fixtures/peft-minilm-lora-options.py). The gradients are exact in
/// both, so their singular values agree to float32 rounding; PEFT factors them with a randomized SVD drawn from
/// PyTorch's global generator, Graft exactly, so the factors agree in direction to that approximation.
@Suite(.serialized) struct LoRAGATests {
    let dir = Assets.fixture("peft-minilm-lora-options/lora_ga")

    @Test func graftsLoRAGAMatchesPEFTsFactors() throws {
        let initial = try SafeTensorsFile(contentsOf: dir + "/loraga_init.safetensors")
        let w = try SafeTensorsFile(contentsOf: dir + "/loraga_inputs.safetensors").tensor("loss_weights")
        let batch = try fixtureBatch(try SafeTensorsFile(contentsOf: Assets.fixture("peft-minilm/base_expected.safetensors")))
        let bert = try Assets.loadMiniLM()
        let model = AdaptedModel(root: bert)
        let json = #"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["query","value"],"init_lora_weights":"lora_ga","lora_ga_config":{"direction":"ArB2r","scale":"stable","stable_gamma":16}}"#
        let adapter = try model.addAdapter("default", config: AdapterConfig(jsonText: json, source: "lora_ga"))
        let base = try model.withAdaptersDisabled { try withNoGrad { try bert.forward(batch) } }
        try model.initializeLoRAGA("default") {
            let loss = sum(try bert.forward(batch) * w)
            #expect(loss.item.isFinite)
            loss.backward()
        }
        let scale = Float(pow(384.0, 0.25) / 4)
        var worstSingular: Float = 0, worstA = 1.0, worstB = 1.0
        for (path, lin, layer) in adapter.layers {
            guard let lora = layer as? LoRALayer else { Issue.record("\(path): not LoRA"); continue }
            #expect(lin.weight.grad == nil && !lin.weight.requiresGrad, "the base weight is frozen again")
            let singular = try initial.tensor(path + ".grad_singular_values").scalars
            let peftA = try initial.tensor(path + ".lora_A"), peftB = try initial.tensor(path + ".lora_B")
            let (r, inF, outF) = (lora.rank, lora.loraA.shape[1], lora.loraB.shape[0])
            for j in 0..<r {
                // ‖B[:, j]‖ = S[r + j] · scale: the gradient's singular values.
                let norm = (0..<outF).reduce(Float(0)) { $0 + lora.loraB.pointer[$1 * r + j] * lora.loraB.pointer[$1 * r + j] }.squareRoot()
                worstSingular = max(worstSingular, abs(norm / scale - singular[r + j]) / singular[r + j])
                func cosine(_ x: Tensor, _ y: Tensor, rows: Bool, n: Int, stride: Int) -> Double {
                    var dot = 0.0, nx = 0.0, ny = 0.0
                    for c in 0..<n {
                        let i = rows ? j * n + c : c * stride + j
                        dot += Double(x.pointer[i]) * Double(y.pointer[i])
                        nx += Double(x.pointer[i] * x.pointer[i])
                        ny += Double(y.pointer[i] * y.pointer[i])
                    }
                    return abs(dot) / (nx * ny).squareRoot()
                }
                worstA = min(worstA, cosine(lora.loraA, peftA, rows: true, n: inF, stride: 0))
                worstB = min(worstB, cosine(lora.loraB, peftB, rows: false, n: outF, stride: r))
            }
        }
        print("LoRA-GA vs PEFT: gradient singular values within \(worstSingular) (relative); worst |cos| A rows \(worstA), B columns \(worstB)")
        #expect(worstSingular < 1e-3)
        #expect(worstA > 0.99 && worstB > 0.99)
        // The layer subtracts s·B₀A₀: the initialised model is the base.
        #expect(maxAbsDifference(try withNoGrad { try bert.forward(batch) }, base) < 1e-4)
        // Saved as PEFT's converted form: a rank-2r LoRA.
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("graft-loraga-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: out) }
        try model.saveAdapter("default", directory: out)
        let saved = try SafeTensorsFile(contentsOf: out + "/adapter_model.safetensors")
        let peft = try SafeTensorsFile(contentsOf: dir + "/adapter_model.safetensors")
        #expect(Set(saved.names) == Set(peft.names))
        for name in peft.names { #expect(saved.info(name)?.shape == peft.info(name)?.shape, "\(name)") }
    }

    @Test func optionsAreCheckedByName() throws {
        let model = AdaptedModel(root: try Assets.loadMiniLM())
        for (extra, key) in [(#""lora_ga_config":{"direction":"random"}"#, "direction"), (#""lora_ga_config":{"scale":"none"}"#, "scale"),
                             (#""use_dora":true"#, "use_dora")] {
            let json = #"{"peft_type":"LORA","r":2,"target_modules":["query"],"init_lora_weights":"lora_ga","# + extra + "}"
            do {
                _ = try model.addAdapter("x", config: AdapterConfig(jsonText: json, source: "lora_ga"))
                Issue.record("\(key): accepted")
            } catch let e as GraftError {
                #expect(e.message.contains(key), "\(e.message)")
            }
        }
        try model.addAdapter("plain", config: AdapterConfig(jsonText: #"{"peft_type":"LORA","r":2,"target_modules":["query"]}"#, source: "plain"))
        #expect(throws: GraftError.self) { try model.initializeLoRAGA("plain") {} }
    }
}
