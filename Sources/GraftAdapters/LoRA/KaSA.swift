import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// KaSA (Wang et al., 2024, "knowledge-aware singular-value adaptation"; PEFT's `kasa_config` on a `LORA` config):
/// the frozen weight loses its `r` smallest singular components, `W' = W − U_d S_d V_dᵀ`, and the update carries a
/// trainable diagonal of singular values between the factors, `ΔW = s·B diag(ΔΣ) A` (`lora_diag` `[r]`, drawn from
/// N(0, 1); `B` starts at zero, so the update does too).
///
/// PEFT rewrites the base weight; Graft keeps it intact and subtracts the dropped component in the layer
/// (`y = W x − U_d S_d V_dᵀ x + s·B (ΔΣ ⊙ A x)`), the same function and gradients, so other adapters and a disabled
/// adapter see the original base (in PEFT they see the truncated one). Merging writes `ΔW − U_d S_d V_dᵀ` into the
/// weight. The paper's regularizers, `β Σ ΔΣ² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)` (`kasa_config.beta`, `.gamma`),
/// which PEFT leaves to the user's loss (`_get_kasa_loss`), join Graft's training loss through ``KaSARegularizer``.
struct KaSAOptions: Equatable {
    /// `β`: weight of the singular-value penalty.
    var beta: Float
    /// `γ`: weight of the orthogonality penalty.
    var gamma: Float

    /// `kasa_config` of `config`, or nil when absent or null.
    static func parse(_ config: AdapterConfig) throws -> KaSAOptions? {
        guard let value = config.value("kasa_config"), !(value is NSNull) else { return nil }
        guard let object = value as? [String: Any] else {
            throw GraftError.invalid("\(config.source): 'kasa_config' must be an object {\"beta\": …, \"gamma\": …} or null, got \(JSONScalar.describe(value))")
        }
        func coefficient(_ key: String, _ fallback: Double) throws -> Float {
            guard let raw = object[key], !(raw is NSNull) else { return Float(fallback) }
            guard let v = JSONScalar.number(raw), v.isFinite, v >= 0 else {
                throw GraftError.invalid("\(config.source): 'kasa_config.\(key)' must be a non-negative number, got \(JSONScalar.describe(raw))")
            }
            return Float(v)
        }
        if let unknown = object.keys.first(where: { $0 != "beta" && $0 != "gamma" }) {
            throw GraftError(.unsupported, "\(config.source): 'kasa_config.\(unknown)' is not a KaSA setting (beta, gamma)")
        }
        return KaSAOptions(beta: try coefficient("beta", 1e-4), gamma: try coefficient("gamma", 1e-3))
    }
}

extension LoRALayer {
    /// Splits off the `rank` smallest singular components of `base.weight` (kept frozen, subtracted in the layer)
    /// and creates the trainable diagonal.
    func initializeKaSA(base: Linear, path: String) throws {
        let k = min(base.inFeatures, base.outFeatures)
        guard rank < k else {
            throw GraftError.invalid("\(path): KaSA needs r (\(rank)) below min(out, in) = \(k), so that a singular component of the weight remains")
        }
        let (u, s, vt) = try svd(base.weight, what: "the weight of '\(path)'")
        let outF = base.outFeatures, inF = base.inFeatures
        let us = Tensor(zeros: [outF, rank]), vh = Tensor(zeros: [rank, inF])
        for (j, i) in ((k - rank)..<k).enumerated() {
            for o in 0..<outF { us.pointer[o * rank + j] = u.pointer[o * k + i] * s.pointer[i] }
            (vh.pointer + j * inF).update(from: vt.pointer + i * inF, count: inF)
        }
        droppedComponent = (us, vh)
        kasaDiagonal = Tensor.randomNormal([rank], rng: &state.rng).requiringGrad()
    }
}

/// KaSA's regularizers over an adapter's layers, added to the training loss (see `KaSA.swift`).
final class KaSARegularizer: AdapterTrainingHook {
    let layers: [LoRALayer]
    let options: KaSAOptions

    init(layers: [LoRALayer], options: KaSAOptions) {
        self.layers = layers
        self.options = options
    }

    func regularization() -> Tensor? {
        var total: Tensor?
        for layer in layers {
            guard let diag = layer.kasaDiagonal else { continue }
            let r = layer.rank
            let identity = Tensor(zeros: [r, r])
            for i in 0..<r { identity.pointer[i * r + i] = 1 }
            var term = sum(diag * diag) * options.beta
            for gram in [matmul(layer.loraB, layer.loraB, transposeA: true), matmul(layer.loraA, layer.loraA, transposeB: true)] {
                let d = gram - identity
                term = term + sqrt(sum(d * d)) * options.gamma
            }
            total = total.map { $0 + term } ?? term
        }
        return total
    }
}
