import GraftModels
import GraftTensor

/// OLoRA (Büyükakyüz, 2024, "orthonormal low-rank adaptation"): LoRA initialized from the QR decomposition of the
/// frozen weight, `init_lora_weights: "olora"` on a `LORA` config (PEFT's value). With `W = Q R` (Householder QR,
/// as `torch.linalg.qr`), `B₀ = Q[:, :r]` (orthonormal columns) and `A₀ = R[:r, :]`; training starts from them on
/// the residual `W − s·B₀A₀`, which Graft realizes as PiSSA does (`PiSSA.swift`): the base weight stays intact and
/// the layer subtracts `s·B₀A₀x`. Unlike PiSSA the factors are not rescaled by `1/s`. A PEFT OLoRA adapter loads
/// by recomputing `B₀A₀` from the base, as PEFT's loader does; Graft saves the equivalent plain rank-`2r` LoRA.
extension LoRALayer {
    /// Initializes `A`, `B` and their frozen copies from the QR decomposition of `base.weight`.
    func initializeOLoRA(base: Linear, path: String) throws {
        let k = min(base.inFeatures, base.outFeatures)
        guard rank <= k else {
            throw GraftError.invalid("\(path): OLoRA rank \(rank) exceeds min(out, in) = \(k) of the \(base.outFeatures)×\(base.inFeatures) weight")
        }
        let (q, r) = try qr(base.weight, what: "the weight of '\(path)'")
        let outF = base.outFeatures, inF = base.inFeatures
        for o in 0..<outF {
            for j in 0..<rank { loraB.pointer[o * rank + j] = q.pointer[o * k + j] }
        }
        loraA.pointer.update(from: r.pointer, count: rank * inF)
        initialFactors = (loraA.copy(), loraB.copy())
    }
}
