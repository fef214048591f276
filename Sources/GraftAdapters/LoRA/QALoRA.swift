import GraftIO
import GraftModels
import GraftTensor

/// QA-LoRA (Xu et al., 2023; PEFT's `use_qalora`, `qalora_group_size` `g`): `A` sees the input averaged over each
/// group of `g` consecutive features, scaled by the number of groups `n = in/g`, as PEFT's `QALoraLinearVariant`:
/// `y = W x + s·B A (n · mean_g(dropout(x)))` with `A: [r, n]`, `B: [out, r]` (keys `lora_A.weight`,
/// `lora_B.weight`). The pooling is a fixed `[n, in]` matrix `G` (`n/g` on each group), so the forward is
/// `x (A G)ᵀ Bᵀ`: two thin products. ΔW = `s·B A G` is constant over each input group, the form a group-wise
/// quantizer absorbs; Graft merges it into float weights (PEFT implements QA-LoRA only for GPTQ layers, where it
/// refuses to merge). `A` starts as `nn.Linear(n, r)` draws it (Kaiming-uniform, bound 1/√n), `B` at zero.
public final class QALoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[r, in/g]`.
    public let loraA: Tensor
    /// `[out, r]`.
    public let loraB: Tensor
    /// The pooling group size `g`.
    public let groupSize: Int
    /// `α/r`, or `α/√r` with rsLoRA.
    public let scaling: Float
    let dropoutProbability: Float
    /// `G` `[in/g, in]`: `n/g` where feature `i` is in group `p`, else 0.
    let pooling: Tensor

    init(base: Linear, rank: Int, alpha: Float, useRSLoRA: Bool, dropout: Float, groupSize: Int, initLoraWeights: Bool,
         state: AdapterState, path: String) throws {
        let inF = base.inFeatures
        guard groupSize > 0, inF % groupSize == 0 else {
            throw GraftError.invalid("\(path): 'use_qalora' needs in_features (\(inF)) divisible by 'qalora_group_size' (\(groupSize))")
        }
        self.state = state
        self.groupSize = groupSize
        scaling = useRSLoRA ? alpha / Float(rank).squareRoot() : alpha / Float(rank)
        dropoutProbability = dropout
        let groups = inF / groupSize
        let bound = 1 / Float(groups).squareRoot()
        loraA = Tensor.randomUniform([rank, groups], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        let bBound = 1 / Float(rank).squareRoot()
        loraB = (initLoraWeights ? Tensor(zeros: [base.outFeatures, rank])
                 : Tensor.randomUniform([base.outFeatures, rank], low: -bBound, high: bBound, rng: &state.rng)).requiringGrad()
        let weight = Float(groups) / Float(groupSize)
        var g = [Float](repeating: 0, count: groups * inF)
        for i in 0..<inF { g[(i / groupSize) * inF + i] = weight }
        pooling = Tensor(shape: [groups, inF], values: g)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("lora_A.weight", loraA), ("lora_B.weight", loraB)] }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        y + linear(linear(dropout(x, p: dropoutProbability, state: state), matmul(loraA, pooling)), loraB) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(loraB, matmul(loraA, pooling)) * scaling }
    }

    public func load(_ name: String, from tensor: Tensor) throws {
        if name == "lora_A.weight", tensor.rank == 2, tensor.shape[0] == loraA.shape[0], tensor.shape[1] == pooling.shape[1] {
            throw GraftError.format("'lora_A.weight' has shape \(tensor.shape), the full input width: PEFT ignores use_qalora on a float Linear (QA-LoRA is GPTQ-only there), so this file is plain LoRA; load it with use_qalora false")
        }
        switch name {
        case "lora_A.weight": try copyParameter(name, into: loraA, from: tensor)
        case "lora_B.weight": try copyParameter(name, into: loraB, from: tensor)
        default: throw GraftError.format("unknown QA-LoRA tensor '\(name)' (expected lora_A.weight, lora_B.weight)")
        }
    }

    /// Checks the options QA-LoRA takes with LoRA's: PEFT's GPTQ layer refuses DoRA; Graft also refuses the
    /// initialisations from W, KaSA and `lora_bias`, which PEFT's QA-LoRA variant does not combine with.
    static func validate(_ config: AdapterConfig) throws {
        let size = try config.int("qalora_group_size", default: 16)
        guard size > 0 else { throw GraftError.invalid("\(config.source): 'qalora_group_size' must be positive, got \(size)") }
        if try config.bool("use_dora", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'use_qalora' cannot be combined with use_dora (as in PEFT)")
        }
        if try config.bool("lora_bias", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'use_qalora' cannot be combined with lora_bias")
        }
        if try KaSAOptions.parse(config) != nil {
            throw GraftError(.unsupported, "\(config.source): 'use_qalora' cannot be combined with kasa_config")
        }
        let initValue = config.value("init_lora_weights")
        if let initValue, JSONScalar.bool(initValue) == nil {
            throw GraftError(.unsupported, "\(config.source): 'use_qalora' takes init_lora_weights true or false, got \(JSONScalar.describe(initValue))")
        }
    }
}
