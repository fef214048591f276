import Foundation
import GraftModels
import GraftTensor
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// LoRA (Hu et al., 2021): `y = W x + (α/r)·B A dropout(x)` with `A: [r, in]`, `B: [out, r]`.
///
/// ΔW is never materialized in forward or backward: the update runs as `(x Aᵀ) Bᵀ`. rsLoRA scales by
/// `α/√r` instead of `α/r`. With `useDoRA` the layer is DoRA (see `DoRA.swift`). PEFT's `lora_bias` gives `B` a
/// bias `b`, scaled with the update: `y = W x + (α/r)·(B A x + b)`; merging adds `(α/r)·b` to the base bias.
public final class LoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The decoding plan of the last ``Int8FactorCopies`` scope that decoded through the layer (declared first, so
    /// a decoding step finds it on the object's first cache line).
    let keptDecodePlan = Mutex<LoRADecodePlan?>(nil)
    /// `[r, in]`.
    public let loraA: Tensor
    /// `[out, r]`.
    public let loraB: Tensor
    /// `lora_B`'s bias `[out]` (PEFT's `lora_bias`); nil without.
    public let loraBias: Tensor?
    /// DoRA's magnitude vector `[out]` (nil for plain LoRA).
    public let magnitude: Tensor?
    /// The rank.
    public let rank: Int
    /// The multiplier of `B A`: `α/r`, or `α/√r` with rsLoRA.
    public let scaling: Float
    /// Dropout probability on the adapter's input while training.
    public let dropoutProbability: Float
    /// Frozen copies `(A₀, B₀)` of an SVD-based initialization (PiSSA, MiLoRA, CorDA; see `PiSSA.swift`).
    ///
    /// Those methods replace the base weight by `W − s·B₀A₀`. Graft never rewrites base weights, so the layer
    /// subtracts `s·B₀A₀x` itself: `y = W x + s·B A x − s·B₀A₀ x`, the same function (and the same gradients)
    /// as PEFT's residual model, with the base left intact for other adapters and `disable_adapter`.
    public internal(set) var initialFactors: (a: Tensor, b: Tensor)?
    /// KaSA's trainable singular values `ΔΣ` `[r]` (`lora_diag`; see `KaSA.swift`); nil for other LoRA.
    public internal(set) var kasaDiagonal: Tensor?
    /// The int8 copies ``decodeInt8Factors`` last found, with the ``Int8FactorCopies/generation`` of the scope that
    /// holds them (under `int8FactorsLock`): a generation's decoding steps look the copies up once, not per token.
    var int8FactorsFound: (generation: UInt64, factors: Int8Factors)?
    let int8FactorsLock = NSLock()
    /// KaSA's frozen dropped component `(U_d S_d [out, r], V_dᵀ [r, in])`, subtracted from the base output.
    public internal(set) var droppedComponent: (us: Tensor, vh: Tensor)?
    /// aLoRA's per-token activation (see `ALoRA.swift`): the update applies only to the tokens it gates on; nil
    /// for other LoRA.
    public internal(set) var activation: ALoRAActivation?
    /// VeLoRA's compressed backward for `lora_A` (see `VeLoRA.swift`); nil for other LoRA.
    var velora: VeLoRAState?
    /// LoftQ's frozen quantization error `W − Q` `[out, in]`, subtracted from the base output (see `LoftQ.swift`).
    public internal(set) var quantizationError: Tensor?
    /// Input statistics gathered for CorDA's initialization (see `CorDA.swift`); nil unless collecting.
    var covarianceCollector: CovarianceCollector?
    /// Input moments gathered for EVA's initialization (see `EVA.swift`); nil unless collecting.
    var momentCollector: InputMomentCollector?
    /// Counts forward passes while LoRA-GA estimates gradients (see `LoRAGA.swift`); nil otherwise.
    var gradientCounter: (() -> Void)?

    /// Creates the layer with PEFT's default initialization: A Kaiming-uniform (a = √5), B zero
    /// (`initLoraWeights == false` draws B like A, so the adapter is not the identity); `gaussianA` draws A from
    /// N(0, 1/r²) instead (PEFT's `init_lora_weights: "gaussian"`). `bias` adds `lora_B`'s bias, zero at
    /// initialization (drawn like nn.Linear's when `initLoraWeights == false`).
    public init(base: Linear, rank: Int, alpha: Float, useRSLoRA: Bool, dropout: Float, useDoRA: Bool,
                initLoraWeights: Bool, gaussianA: Bool = false, bias: Bool = false, state: AdapterState) {
        self.state = state
        self.rank = rank
        scaling = useRSLoRA ? alpha / Float(rank).squareRoot() : alpha / Float(rank)
        dropoutProbability = dropout
        // kaiming_uniform_(a=√5) on [r, in]: bound = √(6 / ((1 + a²)·fan_in)) = 1/√fan_in.
        let bound = 1 / Float(base.inFeatures).squareRoot()
        loraA = (gaussianA ? Tensor.randomNormal([rank, base.inFeatures], std: 1 / Float(rank), rng: &state.rng)
                           : Tensor.randomUniform([rank, base.inFeatures], low: -bound, high: bound, rng: &state.rng)).requiringGrad()
        let bBound = 1 / Float(rank).squareRoot()
        if initLoraWeights {
            loraB = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
            loraBias = bias ? Tensor(zeros: [base.outFeatures]).requiringGrad() : nil
        } else {
            loraB = Tensor.randomUniform([base.outFeatures, rank], low: -bBound, high: bBound, rng: &state.rng).requiringGrad()
            loraBias = bias ? Tensor.randomUniform([base.outFeatures], low: -bBound, high: bBound, rng: &state.rng).requiringGrad() : nil
        }
        if useDoRA {
            magnitude = Tensor(zeros: [base.outFeatures]).requiringGrad()
            let norms = LoRALayer.rowNorms(base.weight, plus: nil, scale: 0)
            magnitude?.pointer.update(from: norms.pointer, count: base.outFeatures)
        } else {
            magnitude = nil
        }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        var p: [(String, Tensor)] = [("lora_A.weight", loraA), ("lora_B.weight", loraB)]
        if let loraBias { p.append(("lora_B.bias", loraBias)) }
        if let kasaDiagonal { p.append(("lora_diag", kasaDiagonal)) }
        if let magnitude { p.append(("lora_magnitude_vector", magnitude)) }
        return p
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        if magnitude != nil { return doraForward(input: x, baseOutput: y, layer: layer) }
        covarianceCollector?.add(x)
        momentCollector?.add(x)
        gradientCounter?()
        if let activation, activation.isIdle { return y }  // aLoRA before its invocation: the base model.
        let input = dropout(x, p: dropoutProbability, state: state)
        let projected: Tensor
        if let velora, state.isTraining, GradMode.isEnabled {
            velora.observe(input)
            projected = velora.project(input, loraA)
        } else {
            projected = linear(input, loraA)
        }
        let h = kasaDiagonal.map { projected * $0 } ?? projected
        var out = y
        let update = linear(h, loraB, loraBias) * scaling
        if let activation {
            if let gated = activation.gated(update) { out = out + gated }
        } else {
            out = out + update
        }
        if let (us, vh) = droppedComponent { out = out - linear(linear(x, vh), us) }
        if let quantizationError { out = out - linear(x, quantizationError) }
        guard let (a0, b0) = initialFactors else { return out }
        return out - linear(linear(x, a0), b0) * scaling
    }

    public var savedBuffers: [(name: String, tensor: Tensor)] {
        velora.map { [("lora_velora_embed", $0.embed)] } ?? []
    }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {
        guard name == "lora_velora_embed", let velora else { throw GraftError.format("unexpected LoRA buffer '\(name)'") }
        try copyParameter(name, into: velora.embed, from: tensor)
    }

    public func deltaBias(base: Linear) -> Tensor? {
        loraBias.map { b in withNoGrad { b * scaling } }
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        guard activation == nil else { return nil }  // aLoRA acts on some tokens only: no weight form.
        let delta = withNoGrad {
            var d = matmul(kasaDiagonal.map { loraB * $0 } ?? loraB, loraA) * scaling
            if let (us, vh) = droppedComponent { d = d - matmul(us, vh) }
            if let quantizationError { d = d - quantizationError }
            guard let (a0, b0) = initialFactors else { return d }
            return d - matmul(b0, a0) * scaling
        }
        guard let magnitude else { return delta }
        // DoRA merges to m/‖W + ΔW‖ · (W + ΔW) − W.
        let weight = base.weight
        let norms = LoRALayer.rowNorms(weight, plus: delta, scale: 1)
        let out = Tensor(zeros: weight.shape)
        let cols = base.inFeatures
        for r in 0..<base.outFeatures {
            let s = magnitude.pointer[r] / norms.pointer[r]
            for c in 0..<cols {
                let w = weight.pointer[r * cols + c], d = delta.pointer[r * cols + c]
                out.pointer[r * cols + c] = s * (w + d) - w
            }
        }
        return out
    }

    public func load(_ name: String, from tensor: Tensor) throws {
        if initialFactors != nil, try loadConvertedFactor(name, from: tensor) { return }
        switch name {
        case "lora_A.weight": try copyParameter(name, into: loraA, from: tensor)
        case "lora_B.weight": try copyParameter(name, into: loraB, from: tensor)
        case "lora_diag":
            guard let kasaDiagonal else { throw GraftError.format("'lora_diag' given for a LoRA layer without kasa_config") }
            try copyParameter(name, into: kasaDiagonal, from: tensor)
        case "lora_B.bias":
            guard let loraBias else { throw GraftError.format("'lora_B.bias' given for a LoRA layer without lora_bias") }
            try copyParameter(name, into: loraBias, from: tensor)
        case "lora_magnitude_vector":
            guard let magnitude else { throw GraftError.format("'lora_magnitude_vector' given for a LoRA layer without use_dora") }
            try copyParameter(name, into: magnitude, from: tensor)
        default: throw GraftError.format("unknown LoRA tensor '\(name)'")
        }
    }

    /// ‖W + scale·Δ‖ per output row, `[out]` (accumulated in Double).
    static func rowNorms(_ w: Tensor, plus delta: Tensor?, scale: Float) -> Tensor {
        let rowsN = w.shape[0], cols = w.shape[1]
        let norms = Tensor(zeros: [rowsN])
        let out = norms.pointer
        for r in 0..<rowsN {
            var s: Double = 0
            for c in 0..<cols {
                var v = w.pointer[r * cols + c]
                if let delta { v += scale * delta.pointer[r * cols + c] }
                s += Double(v) * Double(v)
            }
            out[r] = Float(s.squareRoot())
        }
        return norms
    }
}
