import GraftModels
import GraftTensor

/// MiLoRA (Wang et al., 2024, "minor singular components"): LoRA initialized from the bottom-r singular
/// triplets of the frozen weight, `init_lora_weights: "milora"` on a `LORA` config (a Graft value; PEFT has
/// none, so saving writes the equivalent plain LoRA PEFT loads). The mechanics are PiSSA's (`PiSSA.swift`):
/// only the choice of components differs, leaving the principal subspace of `W` untouched by the update's
/// initialization.
extension LoRALayer {
    /// Initializes from the `rank` smallest singular triplets of `base.weight`.
    func initializeMinorComponents(base: Linear, path: String) throws {
        try initializeFromWeightSVD(base: base, minor: true, path: path)
    }
}
