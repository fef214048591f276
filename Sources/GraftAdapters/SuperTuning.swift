import Foundation
import GraftModels
import GraftTensor

/// Super-Tuning: trainable values at the `(1 − sparsity)` fraction of weight entries with the largest (or, with
/// `select_top: false`, smallest) magnitude, scatter-added onto the frozen weight, plus an optional LoRA of rank `r`
/// scaled by `lora_alpha / r`. The sparse part runs as a gather/scatter over its entries (no dense ΔW). PEFT keys
/// `supertuning_values` `[k]`, `supertuning_indices` `[k]` (int32, flat positions in the weight, saved with
/// `save_precomputed_indices`), `supertuning_lora_A.weight`, `supertuning_lora_B.weight`.
public final class SuperTuningLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The trainable sparse values `[k]`.
    public let values: Tensor
    /// Flat positions `row · in + col` of the values.
    var indices: [Int32]
    /// LoRA factors `[r, in]`, `[out, r]` when `r` is set.
    public let loraA: Tensor?, loraB: Tensor?
    let loraScaling: Float
    let saveIndices: Bool
    let dropoutProbability: Float
    let inFeatures: Int, outFeatures: Int

    init(base: Linear, sparsity: Double, selectTop: Bool, rank: Int?, alpha: Double, initWeights: Bool,
         saveIndices: Bool, dropout: Float, state: AdapterState) throws {
        let count = base.weight.count
        let k = Int(Double(count) * (1 - sparsity))
        guard k >= 1 else { throw GraftError.invalid("sparsity \(sparsity) leaves no trainable entries of \(count)") }
        self.state = state
        self.saveIndices = saveIndices
        dropoutProbability = dropout
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        let w = base.weight.scalars
        // torch.topk(|W|, k): descending magnitude (ascending with select_top false), ties by position.
        let order = (0..<count).sorted { i, j in
            let (a, b) = (abs(w[i]), abs(w[j]))
            return a != b ? (selectTop ? a > b : a < b) : i < j
        }
        indices = order.prefix(k).map { Int32($0) }
        values = (initWeights ? Tensor(zeros: [k]) : Tensor.randomNormal([k], rng: &state.rng)).requiringGrad()
        if let rank {
            loraA = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
            loraB = (initWeights ? Tensor(zeros: [base.outFeatures, rank]) : kaimingUniform(base.outFeatures, rank, rng: &state.rng)).requiringGrad()
            loraScaling = Float(alpha / Double(rank))
        } else {
            loraA = nil
            loraB = nil
            loraScaling = 0
        }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        var out: [(name: String, tensor: Tensor)] = [("supertuning_values", values)]
        if let a = loraA, let b = loraB { out += [("supertuning_lora_A.weight", a), ("supertuning_lora_B.weight", b)] }
        return out
    }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        saveIndices ? [("supertuning_indices", indices, [indices.count])] : []
    }

    public func loadIntegers(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        guard name == "supertuning_indices" else { throw GraftError.format("unexpected integer tensor '\(name)' for Super-Tuning") }
        guard shape == [indices.count] else { throw GraftError.format("'\(name)' has shape \(shape), the layer expects [\(indices.count)]") }
        if let bad = loaded.first(where: { $0 < 0 || $0 >= Int64(inFeatures * outFeatures) }) {
            throw GraftError.format("'\(name)' holds position \(bad), outside the \(outFeatures)×\(inFeatures) weight")
        }
        indices = loaded.map { Int32($0) }
    }

    /// `x ΔW_sparseᵀ` `[rows, out]` for `x: [rows, in]`, recorded for autograd through `x` and the values.
    func sparseProduct(_ x: Tensor) -> Tensor {
        let rows = x.count / inFeatures
        let (inF, outF) = (inFeatures, outFeatures)
        let values = values, nnz = indices.count
        let rowOf = indices.map { Int($0) / inF }, colOf = indices.map { Int($0) % inF }
        let out = Tensor(zeros: [rows, outF])
        let px = x.pointer, pv = values.pointer, po = out.pointer
        parallelFor(rows, grain: 16) { range in
            rowOf.withUnsafeBufferPointer { ro in
                colOf.withUnsafeBufferPointer { co in
                    for t in range { for k in 0..<nnz { po[t * outF + ro[k]] += pv[k] * px[t * inF + co[k]] } }
                }
            }
        }
        return Tensor.recordingCustomOp(out, inputs: [x, values]) { g in
            let pg = g.pointer, px = x.pointer, pv = values.pointer
            var dx: Tensor? = nil, dv: Tensor? = nil
            if x.requiresGrad {
                let t = Tensor(zeros: x.shape)
                let pt = t.pointer
                parallelFor(rows, grain: 16) { range in
                    for r in range { for k in 0..<nnz { pt[r * inF + colOf[k]] += pv[k] * pg[r * outF + rowOf[k]] } }
                }
                dx = t
            }
            if values.requiresGrad {
                let t = Tensor(zeros: values.shape)
                let pt = t.pointer
                for r in 0..<rows { for k in 0..<nnz { pt[k] += pg[r * outF + rowOf[k]] * px[r * inF + colOf[k]] } }
                dv = t
            }
            return [dx, dv]
        }
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        var out = y + sparseProduct(x).reshaped(y.shape)
        if let a = loraA, let b = loraB {
            out = out + linear(linear(dropout(x, p: dropoutProbability, state: state), a), b) * loraScaling
        }
        return out
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let delta = Tensor(zeros: [outFeatures, inFeatures])
            for (k, flat) in indices.enumerated() { delta.pointer[Int(flat)] += values.pointer[k] }
            guard let a = loraA, let b = loraB else { return delta }
            return delta + matmul(b, a) * loraScaling
        }
    }
}

/// Super-Tuning (`peft_type: "SUPERTUNING"`): `sparsity`, `select_top`, `r` and `lora_alpha` (the optional LoRA),
/// `lora_dropout`, `init_weights`, `save_precomputed_indices`.
public enum SuperTuningFactory: AdapterMethodFactory {
    public static let peftType = "SUPERTUNING"
    public static let family = "weight-delta (magnitude-selected sparse + low rank)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["sparsity": 0.99, "r": 4, "lora_alpha": 8, "target_modules": targets] }

    static func rank(_ config: AdapterConfig) throws -> Int? {
        let v = config.value("r")
        return v == nil || v is NSNull ? nil : try config.int("r", default: 0)
    }

    public static func validate(_ config: AdapterConfig) throws {
        let sparsity = try config.double("sparsity", default: 0.99)
        guard sparsity >= 0, sparsity < 1 else { throw GraftError.invalid("\(config.source): 'sparsity' must be in [0, 1), got \(sparsity)") }
        if let r = try rank(config) {
            guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
            let alpha = config.value("lora_alpha")
            guard alpha != nil, !(alpha is NSNull) else { throw GraftError.invalid("\(config.source): 'lora_alpha' is required when 'r' is set") }
        }
        let p = try config.double("lora_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'lora_dropout' must be in [0, 1), got \(p)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let r = try rank(config)
        do {
            return try SuperTuningLayer(base: layer, sparsity: try config.double("sparsity", default: 0.99),
                                        selectTop: try config.bool("select_top", default: true), rank: r,
                                        alpha: r == nil ? 0 : try config.double("lora_alpha", default: 8),
                                        initWeights: try config.bool("init_weights", default: true),
                                        saveIndices: try config.bool("save_precomputed_indices", default: true),
                                        dropout: Float(try config.double("lora_dropout", default: 0)), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
