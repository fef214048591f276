import GraftModels
import GraftTensor

/// DoRA (Liu et al., 2024): weight-decomposed LoRA. The adapted weight is `m · (W + s·BA) / ‖W + s·BA‖`
/// with the row norm treated as a constant (detached), as in the paper and PEFT. Forward without forming it:
/// `y = base(x) + (m/‖·‖ − 1)·(x Wᵀ) + (m/‖·‖)·s·(x Aᵀ Bᵀ)`.
extension LoRALayer {
    func doraForward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        guard let magnitude else { return y }
        let out = layer.outFeatures
        // ‖W + s·B A‖ per output row, detached.
        let delta = withNoGrad { matmul(loraB, loraA) }
        let norms = LoRALayer.rowNorms(layer.weight, plus: delta, scale: scaling)
        let inverse = Tensor(zeros: [out])
        for i in 0..<out { inverse.pointer[i] = 1 / norms.pointer[i] }
        let magNormScale = magnitude * inverse  // [out], tracked through magnitude
        let xd = dropout(x, p: dropoutProbability, state: state)
        let loraOut = linear(linear(xd, loraA), loraB) * scaling
        // The base output without its bias; with dropout active PEFT recomputes it from the dropped input.
        let baseNoBias: Tensor
        if dropoutProbability > 0 && state.isTraining {
            baseNoBias = linear(xd, layer.weight)
        } else if let bias = layer.bias {
            baseNoBias = y - bias
        } else {
            baseNoBias = y
        }
        let scaleMinusOne = add(magNormScale, -1)
        let result = y + baseNoBias * scaleMinusOne + loraOut * magNormScale
        return result
    }
}
