import GraftModels
import GraftTensor

/// SPT (He et al., 2023, sensitivity-aware parameter-efficient fine-tuning): a global budget of trainable
/// entries goes to the most sensitive weights of all targeted layers; a layer that would get more than its
/// threshold is tuned with LoRA instead of entry by entry.
///
/// For the first `warmup_steps` optimizer steps every layer adds a dense zero probe `P` (`y += P x`, as RoSA's
/// warm-up) while training and sums the squared gradient `(∂L/∂W)²` of each entry (the loss change a gradient step
/// on that entry alone would bring, SPT's first-order sensitivity). After the last warm-up step ``SPTAllocator``
/// takes the `τ = ⌈budget_density · Σ out·in⌉` most sensitive entries over all layers (ties to the lower layer and
/// index); a layer holding more than `⌊lora_threshold · out · in⌋` of them switches to LoRA (`ΔW = s·B A`,
/// `A` Kaiming-uniform, `B` zero, `s = α/r`), the others train exactly their chosen entries as a sparse delta.
/// Until then the layer adds nothing (both parts are gated to zero, so their gradients are zeros). Every layer
/// holds both parts from the start, the sparse values sized to the threshold (the optimizer sees fixed tensors,
/// so the trainable count shown counts both); the unused part never gets a gradient and stays at its start. Keys
/// `spt_A.weight`, `spt_B.weight`, `spt_values`, `spt_indices` `[2, cap]` (row, column; int32; −1 past the chosen
/// entries) and `spt_mode` `[1]` int32 (0 warming up, 1 sparse, 2 LoRA). Graft's own method: PEFT has no SPT.
public final class SPTLayer: LinearAdapterMethod, AdapterTrainingHook {
    /// Where the layer is in its schedule.
    public enum Mode: Int32, Sendable { case warmingUp = 0, sparse = 1, lora = 2 }

    public let state: AdapterState
    /// `[r, in]`.
    public let loraA: Tensor
    /// `[out, r]`.
    public let loraB: Tensor
    /// `α/r`.
    public let scaling: Float
    /// The sparse entries, sized to the threshold; the first ``rowIndex``.count are live.
    public let values: Tensor
    /// The chosen positions (sparse mode).
    public private(set) var rowIndex: [Int32] = [], colIndex: [Int32] = []
    /// The current mode.
    public private(set) var mode: Mode = .warmingUp
    let outFeatures: Int, inFeatures: Int
    private var probe: Tensor?
    /// Σ (∂L/∂W)² over the warm-up (dense, dropped after allocation).
    private(set) var sensitivity: [Float]?

    /// Creates the layer warming up; `threshold` is the fraction of entries above which it takes LoRA.
    public init(base: Linear, rank: Int, alpha: Float, threshold: Double, state: AdapterState) {
        self.state = state
        outFeatures = base.outFeatures
        inFeatures = base.inFeatures
        scaling = alpha / Float(rank)
        loraA = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
        loraB = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        values = Tensor(zeros: [max(1, Int(threshold * Double(base.outFeatures * base.inFeatures)))]).requiringGrad()
    }

    /// The most entries the layer trains as a sparse delta.
    public var capacity: Int { values.count }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("spt_A.weight", loraA), ("spt_B.weight", loraB), ("spt_values", values)]
    }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        let pad = [Int32](repeating: -1, count: capacity - rowIndex.count)
        return [("spt_indices", rowIndex + pad + colIndex + pad, [2, capacity]), ("spt_mode", [mode.rawValue], [1])]
    }

    public func loadIntegers(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        switch name {
        case "spt_mode":
            guard shape == [1], let v = loaded.first, let m = Int32(exactly: v).flatMap(Mode.init(rawValue:)) else {
                throw GraftError.format("'spt_mode' must be one int32 of 0, 1 or 2, got \(loaded) (shape \(shape))")
            }
            mode = m
            if m != .warmingUp { probe = nil; sensitivity = nil }
        case "spt_indices":
            let n = capacity
            guard shape == [2, n], loaded.count == 2 * n else { throw GraftError.format("'\(name)' has shape \(shape), expected [2, \(n)]") }
            let live = loaded.prefix(n).firstIndex(of: -1) ?? n
            guard loaded.prefix(n).dropFirst(live).allSatisfy({ $0 == -1 }), loaded.suffix(n).dropFirst(live).allSatisfy({ $0 == -1 }) else {
                throw GraftError.format("'\(name)': unused entries (−1) must follow the chosen ones")
            }
            (rowIndex, colIndex) = try SparseDelta.validatedIndices(name, Array(loaded.prefix(live)) + Array(loaded.suffix(n).prefix(live)),
                                                                    shape: [2, live], count: live, rows: outFeatures, cols: inFeatures)
        default:
            throw GraftError.format("unknown SPT integer tensor '\(name)'")
        }
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        switch mode {
        case .warmingUp:
            guard GradMode.isEnabled else { return y }
            // Both parts gated to zero while recording, so their gradients exist (as zeros) like RoSA's.
            var out = y + sparseLinear(x, values: values, rowIndex: [], colIndex: [], outFeatures: outFeatures)
                + linear(linear(x, loraA), loraB) * 0
            if state.isTraining {
                let p = probe ?? Tensor(zeros: [outFeatures, inFeatures]).requiringGrad()
                probe = p
                out = out + linear(x, p)
            }
            return out
        case .sparse:
            return y + sparseLinear(x, values: values, rowIndex: rowIndex, colIndex: colIndex, outFeatures: outFeatures)
        case .lora:
            return y + linear(linear(x, loraA), loraB) * scaling
        }
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            switch mode {
            case .warmingUp: return Tensor(zeros: [outFeatures, inFeatures])
            case .lora: return matmul(loraB, loraA) * scaling
            case .sparse:
                let d = Tensor(zeros: [outFeatures, inFeatures])
                scatterAdd(into: d, values: values, rowIndex: rowIndex, colIndex: colIndex)
                return d
            }
        }
    }

    /// Adds the probe's squared gradient to the sensitivity during the warm-up.
    public func afterBackward(step: Int) {
        guard mode == .warmingUp, let p = probe, let g = p.grad else { return }
        if sensitivity == nil { sensitivity = [Float](repeating: 0, count: p.count) }
        sensitivity?.withUnsafeMutableBufferPointer { s in
            for i in 0..<s.count { s[i] += g.pointer[i] * g.pointer[i] }
        }
        p.grad = nil
    }

    /// Ends the warm-up with `chosen` (flat positions, this layer's share of the budget).
    func settle(chosen: [Int]) {
        if chosen.count > capacity {
            mode = .lora
        } else {
            mode = .sparse
            let sorted = chosen.sorted()
            rowIndex = sorted.map { Int32($0 / inFeatures) }
            colIndex = sorted.map { Int32($0 % inFeatures) }
        }
        probe = nil
        sensitivity = nil
    }
}

/// SPT's global allocation (see ``SPTLayer``): after warm-up step `warmup_steps`, the budget goes to the most
/// sensitive entries of all layers, and each layer settles into sparse or LoRA mode.
public final class SPTAllocator: AdapterTrainingHook {
    /// The adapter's layers.
    public let layers: [SPTLayer]
    /// Trainable entries over all layers.
    public let budget: Int
    /// The optimizer step that ends the warm-up.
    public let warmupSteps: Int

    init(layers: [SPTLayer], budgetDensity: Double, warmupSteps: Int) {
        self.layers = layers
        self.warmupSteps = warmupSteps
        let total = layers.reduce(0) { $0 + $1.outFeatures * $1.inFeatures }
        budget = min(total, max(1, Int((budgetDensity * Double(total)).rounded(.up))))
    }

    public func didUpdate(step: Int, totalSteps: Int) {
        if step == warmupSteps { allocate() }
    }

    /// Distributes the budget by sensitivity (layers without a warm-up gradient count as all zero) and settles
    /// every layer still warming up.
    public func allocate() {
        let pending = layers.filter { $0.mode == .warmingUp }
        guard !pending.isEmpty else { return }
        let scores = pending.map { layer in
            (layer.sensitivity ?? [Float](repeating: 0, count: layer.outFeatures * layer.inFeatures)).map { $0.isNaN ? -1 : $0 }
        }
        let all = scores.flatMap { $0 }
        let count = min(budget, all.count)
        // The count-th largest score; everything above it wins, then ties in (layer, position) order.
        let cut = all.sorted(by: >)[count - 1]
        var chosen = [[Int]](repeating: [], count: pending.count)
        var ties = count - all.reduce(0) { $0 + ($1 > cut ? 1 : 0) }
        for (l, s) in scores.enumerated() {
            for i in 0..<s.count where s[i] > cut || (s[i] == cut && ties > 0) {
                if s[i] == cut { ties -= 1 }
                chosen[l].append(i)
            }
        }
        for (l, layer) in pending.enumerated() { layer.settle(chosen: chosen[l]) }
    }
}

/// SPT (`peft_type: "SPT"`, no PEFT counterpart): `budget_density` (the trainable budget as a fraction of all
/// targeted entries, default 0.01), `lora_threshold` (the fraction of a layer's entries above which it takes LoRA,
/// default 0.02), `r`, `lora_alpha` (of that LoRA), `warmup_steps` (optimizer steps whose gradients measure the
/// sensitivity, ≥ 1, default 10).
public enum SPTFactory: AdapterMethodFactory {
    public static let peftType = "SPT"
    public static let family = "selective (sensitivity budget, sparse or LoRA)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["budget_density": 0.02, "lora_threshold": 0.03, "r": 4, "lora_alpha": 8, "warmup_steps": 2, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try config.fraction("budget_density", default: 0.01)
        _ = try config.fraction("lora_threshold", default: 0.02)
        let r = try config.int("r", default: 8)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let warmup = try config.int("warmup_steps", default: 10)
        guard warmup >= 1 else { throw GraftError.invalid("\(config.source): 'warmup_steps' must be ≥ 1 (sensitivity comes from warm-up gradients), got \(warmup)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "lora_alpha")
        return SPTLayer(base: layer, rank: r, alpha: alpha, threshold: try config.double("lora_threshold", default: 0.02), state: state)
    }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        SPTAllocator(layers: adapter.layers.compactMap { $0.adapter as? SPTLayer },
                     budgetDensity: try adapter.config.double("budget_density", default: 0.01),
                     warmupSteps: try adapter.config.int("warmup_steps", default: 10))
    }
}
