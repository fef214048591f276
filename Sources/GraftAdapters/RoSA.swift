import GraftModels
import GraftTensor

/// RoSA (Nikdan et al., 2024, robust adaptation): a low-rank plus a sparse update,
/// `ΔW = s·B A + S`, `A: [r, in]` Kaiming-uniform, `B: [out, r]` zero, `s = α/r`, and `S` nonzero only on a
/// mask of `⌈density · out · in⌉` entries.
///
/// The mask is chosen from the data: for the first `warmup_steps` optimizer steps the layer adds a dense
/// zero probe `P` to its weight (`y += P x`) and accumulates the squared gradient `(∂L/∂P)²` (the empirical
/// Fisher diagonal, a magnitude criterion) after every backward, through ``AdapterTrainingHook``; at the end of
/// the last warm-up step the top-`n` entries become the mask. Until then `S` is zero and untrained (its values
/// are gated by 0, so they get zero gradients and AdamW leaves them at 0); afterwards they train like LoRA's.
/// Without a trainer calling the hook (plain inference) the probe is never added.
///
/// Keys: `rosa_A.weight`, `rosa_B.weight`, `rosa_spa_values` `[n]` and `rosa_spa_indices` `[2, n]` (row,
/// column; int32). A loaded mask is used as is; an adapter saved before its mask was chosen stores the indices
/// as −1 and zero values, and continues its warm-up when loaded.
public final class RoSALayer: LinearAdapterMethod, AdapterTrainingHook {
    public let state: AdapterState
    /// `[r, in]`.
    public let loraA: Tensor
    /// `[out, r]`.
    public let loraB: Tensor
    /// The sparse entries of S (`[n]`).
    public let values: Tensor
    /// `α/r`.
    public let scaling: Float
    /// Optimizer steps whose gradients pick the mask.
    public let warmupSteps: Int
    /// Whether the mask has been chosen (or loaded).
    public private(set) var maskReady = false
    private(set) var rowIndex: [Int32]
    private(set) var colIndex: [Int32]
    let outFeatures: Int, inFeatures: Int
    let dropoutProbability: Float
    /// The dense probe whose gradient is scored during the warm-up, and the accumulated scores.
    private var probe: Tensor?
    private var scores: [Float]?

    /// Creates the layer; throws naming `path` when the density gives no entry or more than the layer has.
    public init(base: Linear, rank: Int, alpha: Float, density: Double, warmupSteps: Int, dropout: Float,
                state: AdapterState, path: String) throws {
        let total = base.outFeatures * base.inFeatures
        let n = Int((density * Double(total)).rounded(.up))
        guard n >= 1, n <= total else {
            throw GraftError.invalid("\(path): RoSA density \(density) gives \(n) sparse entries for a \(base.outFeatures)×\(base.inFeatures) layer")
        }
        self.state = state
        scaling = alpha / Float(rank)
        self.warmupSteps = warmupSteps
        outFeatures = base.outFeatures
        inFeatures = base.inFeatures
        dropoutProbability = dropout
        loraA = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
        loraB = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        values = Tensor(zeros: [n]).requiringGrad()
        rowIndex = (0..<n).map { Int32($0 / base.inFeatures) }
        colIndex = (0..<n).map { Int32($0 % base.inFeatures) }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("rosa_A.weight", loraA), ("rosa_B.weight", loraB), ("rosa_spa_values", values)]
    }

    /// Before the mask exists the indices are written as −1 (no mask yet), so a checkpoint taken during the
    /// warm-up resumes the warm-up (with the squared gradients gathered so far lost) instead of a placeholder mask.
    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        let n = rowIndex.count
        return [("rosa_spa_indices", maskReady ? rowIndex + colIndex : [Int32](repeating: -1, count: 2 * n), [2, n])]
    }

    public func loadIntegers(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        guard name == "rosa_spa_indices" else { throw GraftError.format("unknown RoSA integer tensor '\(name)'") }
        let n = values.count
        guard shape == [2, n], loaded.count == 2 * n else {
            throw GraftError.format("'rosa_spa_indices' has shape \(shape), expected [2, \(n)]")
        }
        if loaded.allSatisfy({ $0 == -1 }) {  // saved during the warm-up: no mask yet
            rowIndex = (0..<n).map { Int32($0 / inFeatures) }
            colIndex = (0..<n).map { Int32($0 % inFeatures) }
            maskReady = false
            return
        }
        (rowIndex, colIndex) = try SparseDelta.validatedIndices("rosa_spa_indices", loaded, shape: shape, count: n,
                                                                rows: outFeatures, cols: inFeatures)
        maskReady = true
        probe = nil
        scores = nil
    }

    /// S as a dense `[out, in]`, recorded (gated to zero before the mask exists).
    private func sparseDelta() -> Tensor {
        let v = maskReady ? values : values * 0
        return denseFromSparse(v, rowIndex: rowIndex, colIndex: colIndex, rows: outFeatures, cols: inFeatures)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state), loraA)
        var s = sparseDelta()
        if !maskReady, state.isTraining {
            let p = probe ?? Tensor(zeros: [outFeatures, inFeatures]).requiringGrad()
            probe = p
            s = s + p
        }
        return y + linear(h, loraB) * scaling + linear(x, s)
    }

    /// Accumulates the probe's squared gradient during the warm-up and picks the mask after its last step.
    public func afterBackward(step: Int) {
        guard !maskReady else { return }
        if let p = probe, let g = p.grad {
            var acc = scores ?? [Float](repeating: 0, count: p.count)
            let pg = g.pointer
            for i in 0..<acc.count { acc[i] += pg[i] * pg[i] }
            scores = acc
            p.grad = nil
        }
        if step + 1 >= warmupSteps, let acc = scores { chooseMask(acc) }
    }

    /// Takes the `n` highest-scoring entries (ties to the lower index) as the mask, sorted row-major.
    func chooseMask(_ acc: [Float]) {
        let n = values.count
        let top = Array(acc.indices.sorted { acc[$0] != acc[$1] ? acc[$0] > acc[$1] : $0 < $1 }.prefix(n)).sorted()
        rowIndex = top.map { Int32($0 / inFeatures) }
        colIndex = top.map { Int32($0 % inFeatures) }
        maskReady = true
        probe = nil
        scores = nil
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(loraB, loraA) * scaling + sparseDelta() }
    }
}

/// RoSA (`peft_type: "ROSA"`, no PEFT counterpart): `r`, `lora_alpha`, `lora_dropout`, `density` (fraction of
/// each layer's entries in S, default 0.01), `warmup_steps` (optimizer steps whose gradients choose the mask,
/// ≥ 1, default 10).
public enum RoSAFactory: AdapterMethodFactory {
    public static let peftType = "ROSA"
    public static let family = "weight-delta (low rank + sparse)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 8, "lora_alpha": 16, "density": 0.01, "warmup_steps": 2, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        _ = try config.fraction("density", default: 0.01)
        let warmup = try config.int("warmup_steps", default: 10)
        guard warmup >= 1 else { throw GraftError.invalid("\(config.source): 'warmup_steps' must be ≥ 1 (the mask comes from warm-up gradients), got \(warmup)") }
        let p = try config.double("lora_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'lora_dropout' must be in [0, 1), got \(p)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "lora_alpha")
        return try RoSALayer(base: layer, rank: r, alpha: alpha, density: try config.double("density", default: 0.01),
                             warmupSteps: try config.int("warmup_steps", default: 10),
                             dropout: Float(try config.double("lora_dropout", default: 0)), state: state,
                             path: "\(config.source): \(path)")
    }
}
