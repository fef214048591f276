import Foundation
import GraftModels
import GraftTensor

/// ID³ (Agarwal et al., 2025, step-by-step unmasking): selective fine-tuning whose trainable set grows during
/// training. Each layer has a budget of `n = ⌈density · out · in⌉` entries of a sparse delta (`y = W x + b + Δ x`,
/// Δ zero at the start); after optimizer step `t` (1-based) exactly `min(n, ⌈n · t / unmask_steps⌉)` entries are
/// unmasked (the increment schedule: the same number every step until the budget is reached at step
/// `unmask_steps`). Each step's new entries are the still-masked positions with the highest importance
/// `|∂L/∂W| / (|W| + ε)^ξ` on that step's gradient (ξ = `exponent`, ε = 1e-8; ξ = 0 ranks by gradient alone,
/// larger ξ favours small weights — Graft's reading of the paper's magnitude-and-gradient D³ metric). Ties go to
/// the lower flat index.
///
/// Scoring every masked position needs the dense ∂L/∂W of the step: until the budget is full the layer adds a
/// dense zero probe `P` (`y += P x`, as RoSA's warm-up) while training and sums its gradient over the step's
/// micro-batches; after that nothing dense remains. The values tensor holds all `n` entries from the start (the
/// optimizer sees a fixed tensor); the masked ones are outside the product and get zero gradients, so they stay
/// 0. Keys `id3_values` `[n]` and `id3_indices` `[2, n]` (row, column; int32; masked entries −1). Graft's own
/// method: PEFT has no ID³.
public final class ID3Layer: LinearAdapterMethod, AdapterTrainingHook {
    public let state: AdapterState
    /// All `n` entries; the first ``unmaskedCount`` are live.
    public let values: Tensor
    /// Positions of the unmasked entries, in unmasking order.
    public private(set) var rowIndex: [Int32] = [], colIndex: [Int32] = []
    /// Optimizer steps over which the budget is unmasked.
    public let unmaskSteps: Int
    /// ξ of the importance.
    public let exponent: Float
    let outFeatures: Int, inFeatures: Int
    private weak var base: Linear?
    private var probe: Tensor?
    private var stepGradient: [Float]?

    /// Creates the layer with nothing unmasked; throws naming `path` when the density gives no entry.
    public init(base: Linear, density: Double, unmaskSteps: Int, exponent: Float, state: AdapterState, path: String) throws {
        let n = try sparseBudget(density: density, total: base.outFeatures * base.inFeatures, path: path, method: "ID³")
        self.state = state
        self.base = base
        self.unmaskSteps = unmaskSteps
        self.exponent = exponent
        outFeatures = base.outFeatures
        inFeatures = base.inFeatures
        values = Tensor(zeros: [n]).requiringGrad()
    }

    /// The budget `n`.
    public var budget: Int { values.count }
    /// Entries unmasked so far.
    public var unmaskedCount: Int { rowIndex.count }

    /// The number of entries unmasked after optimizer step `step`.
    public func scheduledCount(afterStep step: Int) -> Int {
        min(budget, Int((Double(budget) * Double(step) / Double(unmaskSteps)).rounded(.up)))
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("id3_values", values)] }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        let pad = [Int32](repeating: -1, count: budget - unmaskedCount)
        return [("id3_indices", rowIndex + pad + colIndex + pad, [2, budget])]
    }

    public func loadIntegers(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        guard name == "id3_indices" else { throw GraftError.format("unknown ID³ integer tensor '\(name)'") }
        let n = budget
        guard shape == [2, n], loaded.count == 2 * n else { throw GraftError.format("'\(name)' has shape \(shape), expected [2, \(n)]") }
        // The unmasked entries come first; the rest are −1.
        let live = loaded.prefix(n).firstIndex(of: -1) ?? n
        guard loaded.prefix(n).dropFirst(live).allSatisfy({ $0 == -1 }), loaded.suffix(n).dropFirst(live).allSatisfy({ $0 == -1 }) else {
            throw GraftError.format("'\(name)': masked entries (−1) must follow the unmasked ones")
        }
        let rows = Array(loaded.prefix(live)), cols = Array(loaded.suffix(n).prefix(live))
        (rowIndex, colIndex) = try SparseDelta.validatedIndices(name, rows + cols, shape: [2, live], count: live,
                                                                rows: outFeatures, cols: inFeatures)
        probe = nil
        stepGradient = nil
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        var out = y + sparseLinear(x, values: values, rowIndex: rowIndex, colIndex: colIndex, outFeatures: outFeatures)
        if state.isTraining, unmaskedCount < budget {
            let p = probe ?? Tensor(zeros: [outFeatures, inFeatures]).requiringGrad()
            probe = p
            out = out + linear(x, p)
        }
        return out
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        let d = Tensor(zeros: [outFeatures, inFeatures])
        scatterAdd(into: d, values: values, rowIndex: rowIndex, colIndex: colIndex)
        return d
    }

    /// Sums the probe's gradient over the step's micro-batches.
    public func afterBackward(step: Int) {
        guard let p = probe, let g = p.grad else { return }
        if stepGradient == nil { stepGradient = [Float](repeating: 0, count: p.count) }
        stepGradient?.withUnsafeMutableBufferPointer { acc in
            for i in 0..<acc.count { acc[i] += g.pointer[i] }
        }
        p.grad = nil
    }

    /// Unmasks up to the schedule's count for `step`, by importance on this step's gradient.
    public func didUpdate(step: Int, totalSteps: Int) {
        unmask(upTo: scheduledCount(afterStep: step))
    }

    /// Unmasks the most important masked positions until `count` are live (no-op when already there).
    public func unmask(upTo count: Int) {
        let want = min(count, budget) - unmaskedCount
        defer { stepGradient = nil }
        guard want > 0 else { return }
        let total = outFeatures * inFeatures
        let w = base?.weight ?? Tensor(zeros: [outFeatures, inFeatures])
        var scores = [Float](repeating: 0, count: total)
        if let g = stepGradient {
            for i in 0..<total {
                let magnitude = abs(w.pointer[i])
                let h = abs(g[i]) / (exponent == 0 ? 1 : powf(magnitude + 1e-8, exponent))
                scores[i] = h.isNaN ? -.greatestFiniteMagnitude : h  // below every score, above the unmasked
            }
        }
        for k in 0..<unmaskedCount { scores[Int(rowIndex[k]) * inFeatures + Int(colIndex[k])] = -.infinity }
        let chosen = scores.withUnsafeBufferPointer { topIndices($0, count: want) }
        rowIndex += chosen.map { Int32($0 / inFeatures) }
        colIndex += chosen.map { Int32($0 % inFeatures) }
        if unmaskedCount == budget { probe = nil }
    }
}

/// ID³ (`peft_type: "ID3"`, no PEFT counterpart): `density` (each layer's budget as a fraction of its entries,
/// default 0.01), `unmask_steps` (optimizer steps until the budget is unmasked, ≥ 1, default 100), `exponent`
/// (ξ ≥ 0 of the importance, default 1).
public enum ID3Factory: AdapterMethodFactory {
    public static let peftType = "ID3"
    public static let family = "selective (incremental unmasking)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["density": 0.02, "unmask_steps": 4, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try config.fraction("density", default: 0.01)
        let steps = try config.int("unmask_steps", default: 100)
        guard steps >= 1 else { throw GraftError.invalid("\(config.source): 'unmask_steps' must be ≥ 1, got \(steps)") }
        let xi = try config.double("exponent", default: 1)
        guard xi >= 0, xi.isFinite else { throw GraftError.invalid("\(config.source): 'exponent' must be ≥ 0, got \(xi)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try ID3Layer(base: layer, density: try config.double("density", default: 0.01),
                     unmaskSteps: try config.int("unmask_steps", default: 100),
                     exponent: Float(try config.double("exponent", default: 1)), state: state, path: "\(config.source): \(path)")
    }
}
