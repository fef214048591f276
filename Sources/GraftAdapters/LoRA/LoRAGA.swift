import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// `lora_ga_config` (PEFT's `LoraGAConfig`): `direction` (`"ArB2r"`, `"A2rBr"`, `"ArBr"`), `scale` (`"stable"`,
/// `"weight_svd"`, `"gd_scale"`), `stable_gamma`.
struct LoRAGAOptions {
    var direction = "ArB2r"
    var scale = "stable"
    var stableGamma = 16.0

    static func parse(_ config: AdapterConfig) throws -> LoRAGAOptions {
        var options = LoRAGAOptions()
        guard let raw = config.value("lora_ga_config"), !(raw is NSNull) else { return options }
        guard let dict = raw as? [String: Any] else { throw GraftError.invalid("\(config.source): 'lora_ga_config' must be an object, got \(raw)") }
        if let unknown = dict.keys.sorted().first(where: { !["direction", "scale", "stable_gamma"].contains($0) }) {
            throw GraftError(.unsupported, "\(config.source): lora_ga_config.\(unknown) is not a LoraGAConfig field (direction, scale, stable_gamma)")
        }
        if let d = dict["direction"] {
            guard let s = d as? String, ["ArB2r", "A2rBr", "ArBr"].contains(s) else {
                throw GraftError(.unsupported, "\(config.source): lora_ga_config.direction must be \"ArB2r\", \"A2rBr\" or \"ArBr\" (\"random\" draws from PyTorch's global generator and is not reproduced), got \(JSONScalar.describe(d))")
            }
            options.direction = s
        }
        if let d = dict["scale"] {
            guard let s = d as? String, ["stable", "weight_svd", "gd_scale"].contains(s) else {
                throw GraftError.invalid("\(config.source): lora_ga_config.scale must be \"stable\", \"weight_svd\" or \"gd_scale\", got \(JSONScalar.describe(d))")
            }
            options.scale = s
        }
        if let g = dict["stable_gamma"] {
            guard let v = JSONScalar.number(g), v > 0 else { throw GraftError.invalid("\(config.source): lora_ga_config.stable_gamma must be positive, got \(JSONScalar.describe(g))") }
            options.stableGamma = v
        }
        return options
    }
}

/// LoRA-GA (Wang et al., 2024; PEFT's `init_lora_weights: "lora_ga"` after `preprocess_loraga`): `A` and `B` from
/// the SVD of the base weight's gradient `G = ∂L/∂W` averaged over the backward passes `run` makes, so the first
/// step follows full fine-tuning. With `G ≈ U S Vᵀ` (`direction` `"ArB2r"`): `A = V[:, :r]ᵀ`,
/// `B = U[:, r:2r] diag(S[r:2r])`, `B` scaled by `out^¼/√γ` (`"stable"`), by `σ₁(W)/S_B[0]` (`"weight_svd"`), or both
/// divided by the LoRA scaling (`"gd_scale"`). PEFT then replaces the base weight by `W − s·B₀A₀`; Graft keeps W and
/// subtracts `s·B₀A₀x` in the layer (as PiSSA, `PiSSA.swift`), and saves the equivalent rank-`2r` LoRA, PEFT's
/// `path_initial_model_for_weight_conversion` form. PEFT factors `G` with the randomized `svd_lowrank` (q = 4r,
/// 4 power iterations) drawn from PyTorch's unseeded global generator; Graft uses the exact SVD, so the factors agree
/// to that approximation, not bit for bit.
extension AdaptedModel {
    /// Initializes the LoRA-GA adapter `name` from the gradients of its layers' base weights while `run` makes
    /// forward and backward passes (for example the loss of a few training batches, `loss.backward()` each).
    public func initializeLoRAGA(_ name: String, run: () throws -> Void) throws {
        let a = try adapter(name)
        guard a.config.peftType == LoRAFactory.peftType, (a.config.value("init_lora_weights") as? String) == "lora_ga" else {
            throw GraftError.invalid("adapter '\(name)' is not a LoRA-GA LoRA (init_lora_weights \"lora_ga\")")
        }
        guard !a.state.isMerged else { throw GraftError(.state, "adapter '\(name)' is merged; unmerge it before initializing LoRA-GA") }
        let options = try LoRAGAOptions.parse(a.config)
        var layers: [(path: String, linear: Linear, lora: LoRALayer)] = []
        for (path, lin, layer) in a.layers {
            guard let lora = layer as? LoRALayer else { throw GraftError(.internalError, "\(path): LoRA-GA layer is not LoRA") }
            guard lora.initialFactors == nil else { throw GraftError(.state, "\(path): LoRA-GA is already initialized") }
            layers.append((path, lin, lora))
        }
        // Gradients reach the base weights only while collecting; the count is the backward passes through each.
        var counts = [Int](repeating: 0, count: layers.count)
        for l in layers { _ = l.linear.weight.requiringGrad(true) }
        defer {
            for l in layers {
                _ = l.linear.weight.requiringGrad(false)
                for (_, p) in l.lora.namedParameters { p.grad = nil }
            }
        }
        for (i, l) in layers.enumerated() { l.lora.gradientCounter = { counts[i] += 1 } }
        defer { for l in layers { l.lora.gradientCounter = nil } }
        try run()
        for (i, l) in layers.enumerated() {
            guard let grad = l.linear.weight.grad, counts[i] > 0 else {
                throw GraftError.invalid("LoRA-GA: no backward pass reached the weight of '\(l.path)' while estimating gradients")
            }
            let mean = withNoGrad { grad * (1 / Float(counts[i])) }
            try l.lora.initializeLoRAGA(base: l.linear, gradient: mean, options: options, path: l.path)
        }
        a.pendingDataInitialization = nil
    }
}

extension LoRALayer {
    /// LoRA-GA's factors from the averaged weight gradient (see ``AdaptedModel/initializeLoRAGA(_:run:)``).
    func initializeLoRAGA(base: Linear, gradient: Tensor, options: LoRAGAOptions, path: String) throws {
        let outF = base.outFeatures, inF = base.inFeatures, k = min(outF, inF)
        guard 2 * rank <= k else {
            throw GraftError.invalid("\(path): LoRA-GA needs 2r = \(2 * rank) singular triplets, the layer has \(k) (\(outF)×\(inF))")
        }
        let (u, s, vt) = try svd(gradient, what: "the weight gradient of '\(path)'")
        let (aRows, bCols): ([Int], [Int]) = switch options.direction {
        case "A2rBr": (Array(rank..<(2 * rank)), Array(0..<rank))
        case "ArBr": (Array(stride(from: 1, to: 2 * rank, by: 2)), Array(stride(from: 0, to: 2 * rank, by: 2)))
        default: (Array(0..<rank), Array(rank..<(2 * rank)))
        }
        var bScale: Float = 1, aScale: Float = 1
        switch options.scale {
        case "stable": bScale = Float(pow(Double(outF), 0.25) / options.stableGamma.squareRoot())
        case "weight_svd":
            let top = try svd(base.weight, what: "the weight of '\(path)'").s.pointer[0]
            let sb = s.pointer[bCols[0]]
            if sb > 0 { bScale = top / sb }
        default:
            aScale = 1 / scaling
            bScale = 1 / scaling
        }
        for (j, i) in aRows.enumerated() { for c in 0..<inF { loraA.pointer[j * inF + c] = vt.pointer[i * inF + c] * aScale } }
        for (j, i) in bCols.enumerated() {
            let f = s.pointer[i] * bScale
            for o in 0..<outF { loraB.pointer[o * rank + j] = u.pointer[o * k + i] * f }
        }
        initialFactors = (loraA.copy(), loraB.copy())
    }
}
