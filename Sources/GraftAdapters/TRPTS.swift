import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// TR-PTS (Luo et al., 2025, task-relevant parameter and token selection), its parameter half: the entries of the
/// frozen weights with the most Fisher information get a trainable sparse delta (`y = W x + b + Δ x`, Δ zero at
/// the start); the token half is ``GraftModels/TokenReduction``, installed by ``TRPTSFactory``.
///
/// For the first `fisher_steps` optimizer steps every layer adds a dense zero probe `P` (`y += P x`, as SPT's
/// warm-up) while training and sums the squared gradient of each entry over the micro-batches, the diagonal
/// empirical Fisher information `F = Σ_b (∂L_b/∂W)²` (per micro-batch: the gradient of a batch's mean loss, not of
/// each example). After the last of those steps ``TRPTSAllocator`` allocates the budget layer by layer: the
/// `budget` entries of highest Fisher over all targeted layers fix each layer's share `n_l` (ties to the earlier
/// layer and index); with `per_neuron` (the default) every output neuron of the layer then keeps its
/// `⌊n_l / out⌋` highest-Fisher input connections and the `n_l mod out` left go to the layer's highest remaining
/// entries, otherwise the layer keeps exactly its share of the global top entries. The budget is kept exactly:
/// the trainable values are one shared `[budget]` tensor; layer `l` trains the slice `offset..<offset + n_l`.
/// Until the allocation a layer adds nothing (its gradient on the values is zero). Keys: shared
/// `base_model.trpts_values` `[budget]`, per layer `trpts_slot` `[2]` int32 (offset, n_l; −1, 0 before the
/// allocation) and `trpts_indices` `[2, max(n_l, 1)]` int32 (row, column; one −1 pair when empty). Graft's own
/// method: PEFT has no TR-PTS.
public final class TRPTSLayer: LinearAdapterMethod, AdapterTrainingHook {
    public let state: AdapterState
    /// Every layer's entries (the adapter's shared trainable tensor).
    public let values: Tensor
    /// Start of this layer's entries in ``values``; −1 until the allocation.
    public private(set) var offset = -1
    /// Positions of this layer's entries.
    public private(set) var rowIndex: [Int32] = [], colIndex: [Int32] = []
    /// The Fisher information summed so far (dense; dropped after the allocation).
    public private(set) var fisher: [Float]?
    let outFeatures: Int, inFeatures: Int
    private var probe: Tensor?
    private var loadedSlot: [Int64]?, loadedIndices: (values: [Int64], shape: [Int])?

    init(base: Linear, values: Tensor, state: AdapterState) {
        self.state = state
        self.values = values
        outFeatures = base.outFeatures
        inFeatures = base.inFeatures
    }

    /// This layer's share of the budget.
    public var count: Int { rowIndex.count }
    /// Whether the allocation has happened.
    public var isAllocated: Bool { offset >= 0 }
    /// The flat positions (`row · in + column`) of this layer's entries.
    public var positions: [Int] { (0..<count).map { Int(rowIndex[$0]) * inFeatures + Int(colIndex[$0]) } }

    /// The values live in the adapter's shared tensor, saved once.
    public var namedParameters: [(name: String, tensor: Tensor)] { [] }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        [("trpts_slot", [Int32(offset), Int32(count)], [2]),
         ("trpts_indices", count > 0 ? rowIndex + colIndex : [-1, -1], [2, max(count, 1)])]
    }

    public func loadIntegers(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        switch name {
        case "trpts_slot":
            guard shape == [2], loaded.count == 2 else { throw GraftError.format("'trpts_slot' has shape \(shape), expected [2]") }
            loadedSlot = loaded
        case "trpts_indices":
            loadedIndices = (loaded, shape)
        default:
            throw GraftError.format("unknown TR-PTS integer tensor '\(name)'")
        }
        guard let slot = loadedSlot, let (indices, indexShape) = loadedIndices else { return }
        loadedSlot = nil
        loadedIndices = nil
        let start = slot[0], n = slot[1]
        guard start >= -1, n >= 0, start + n <= Int64(values.count), start >= 0 || n == 0 else {
            throw GraftError.format("'trpts_slot' (\(start), \(n)) is outside the adapter's \(values.count) values")
        }
        guard n > 0 else {
            guard indexShape == [2, 1], indices == [-1, -1] else {
                throw GraftError.format("'trpts_indices' must be one (−1, −1) pair for a layer without entries, got shape \(indexShape)")
            }
            settle(offset: Int(start), positions: [])
            return
        }
        let (r, c) = try SparseDelta.validatedIndices("trpts_indices", indices, shape: indexShape, count: Int(n),
                                                      rows: outFeatures, cols: inFeatures)
        offset = Int(start)
        rowIndex = r
        colIndex = c
        probe = nil
        fisher = nil
    }

    /// This layer's entries as a tensor of their own (recorded: gradients reach the shared values).
    private var slice: Tensor { values.slice(dim: 0, offset..<(offset + count)) }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        if isAllocated {
            guard count > 0 else { return y }
            return y + sparseLinear(x, values: slice, rowIndex: rowIndex, colIndex: colIndex, outFeatures: outFeatures)
        }
        guard GradMode.isEnabled else { return y }
        // No entry yet: the values still get a (zero) gradient, as SPT's gated parts do.
        var out = y + sparseLinear(x, values: values, rowIndex: [], colIndex: [], outFeatures: outFeatures)
        if state.isTraining {
            let p = probe ?? Tensor(zeros: [outFeatures, inFeatures]).requiringGrad()
            probe = p
            out = out + linear(x, p)
        }
        return out
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        let d = Tensor(zeros: [outFeatures, inFeatures])
        if count > 0 { withNoGrad { scatterAdd(into: d, values: slice, rowIndex: rowIndex, colIndex: colIndex) } }
        return d
    }

    /// Adds the probe's squared gradient to the Fisher information before the allocation.
    public func afterBackward(step: Int) {
        guard !isAllocated, let p = probe, let g = p.grad else { return }
        if fisher == nil { fisher = [Float](repeating: 0, count: p.count) }
        fisher?.withUnsafeMutableBufferPointer { f in
            let pg = g.pointer
            for i in 0..<f.count { f[i] += pg[i] * pg[i] }
        }
        p.grad = nil
    }

    /// Ends the Fisher phase: this layer trains `positions` (flat, distinct) at values `offset..<offset + count`.
    func settle(offset: Int, positions: [Int]) {
        let sorted = positions.sorted()
        self.offset = offset
        rowIndex = sorted.map { Int32($0 / inFeatures) }
        colIndex = sorted.map { Int32($0 % inFeatures) }
        probe = nil
        fisher = nil
    }
}

/// TR-PTS's layer-wise allocation (see ``TRPTSLayer``) after step `fisher_steps`, its log and report lines, and
/// the token reduction's counts.
public final class TRPTSAllocator: AdapterTrainingHook {
    /// The adapter's layers with their module paths.
    public let layers: [(path: String, layer: TRPTSLayer)]
    /// Trainable entries over all layers.
    public let budget: Int
    /// The optimizer step that ends the Fisher phase.
    public let fisherSteps: Int
    /// Whether each layer's share is spread over its output neurons.
    public let perNeuron: Bool
    /// The token reduction installed with the adapter, if any.
    public internal(set) var tokenReduction: TokenReduction?
    private var pendingReset = false, pendingLog: [String] = []

    init(layers: [(path: String, layer: TRPTSLayer)], budget: Int, fisherSteps: Int, perNeuron: Bool) {
        self.layers = layers
        self.budget = budget
        self.fisherSteps = fisherSteps
        self.perNeuron = perNeuron
    }

    public func didUpdate(step: Int, totalSteps: Int) {
        if step == fisherSteps { allocate() }
    }

    public func takeParametersToReset() -> [Tensor] {
        defer { pendingReset = false }
        return pendingReset ? [layers.first?.layer.values].compactMap { $0 } : []
    }

    public func takeLogLines() -> [String] {
        defer { pendingLog = [] }
        return pendingLog
    }

    public func reportLines() -> [String] {
        var lines = layers.map { path, layer in
            let total = layer.outFeatures * layer.inFeatures
            return layer.isAllocated
                ? "TR-PTS \(path): \(layer.count) entries (\(String(format: "%.2f", 100 * Double(layer.count) / Double(total)))%)"
                : "TR-PTS \(path): not allocated yet (Fisher phase: \(fisherSteps) steps)"
        }
        if let r = tokenReduction, r.statistics.passes > 0 {
            let s = r.statistics
            let tokens = 100 * (1 - Double(s.layerTokensReduced) / Double(max(1, s.layerTokensFull)))
            let flops = 100 * (1 - s.flopsReduced / max(1, s.flopsFull))
            lines.append("TR-PTS tokens: keep \(r.keepRatio) at layers \(r.layers.sorted()) (\(r.mode.rawValue)), \(s.sequences) sequences: "
                         + "\(s.layerTokensFull) → \(s.layerTokensReduced) tokens through the layers (−\(String(format: "%.1f", tokens))%), "
                         + "encoder FLOPs −\(String(format: "%.1f", flops))%")
        }
        return lines
    }

    /// Allocates the budget by Fisher information (a layer without a gradient counts as all zero, a NaN as below
    /// every real score) and settles every layer not yet allocated.
    public func allocate() {
        guard layers.contains(where: { !$0.layer.isAllocated }) else { return }
        let scores = layers.map { _, layer in
            (layer.fisher ?? [Float](repeating: 0, count: layer.outFeatures * layer.inFeatures)).map { $0.isNaN ? -1 : $0 }
        }
        let shares = Self.globalShares(scores, budget: budget)
        var offset = 0
        for (l, (_, layer)) in layers.enumerated() {
            let chosen = perNeuron
                ? Self.perNeuron(scores[l], rows: layer.outFeatures, cols: layer.inFeatures, count: shares[l].count)
                : shares[l]
            layer.settle(offset: offset, positions: chosen)
            offset += chosen.count
        }
        pendingReset = true
        let summary = layers.map { "\($0.layer.count)" }.joined(separator: ", ")
        pendingLog.append("TR-PTS: \(budget) entries chosen by Fisher information after step \(fisherSteps); per layer \(summary)")
    }

    /// Each layer's entries among the `budget` highest scores over all layers (ties to the earlier layer and index).
    static func globalShares(_ scores: [[Float]], budget: Int) -> [[Int]] {
        let all = scores.flatMap { $0 }
        let count = min(budget, all.count)
        guard count > 0 else { return scores.map { _ in [] } }
        let cut = all.sorted(by: >)[count - 1]
        var ties = count - all.reduce(0) { $0 + ($1 > cut ? 1 : 0) }
        var chosen = [[Int]](repeating: [], count: scores.count)
        for (l, s) in scores.enumerated() {
            for i in 0..<s.count where s[i] > cut || (s[i] == cut && ties > 0) {
                if s[i] == cut { ties -= 1 }
                chosen[l].append(i)
            }
        }
        return chosen
    }

    /// `count` entries of a `[rows, cols]` layer: each row's `⌊count / rows⌋` highest scores, then the
    /// `count mod rows` highest of the rest (ties to the lower index).
    static func perNeuron(_ scores: [Float], rows: Int, cols: Int, count: Int) -> [Int] {
        let k = count / rows
        var chosen: [Int] = []
        chosen.reserveCapacity(count)
        var rest = scores
        scores.withUnsafeBufferPointer { s in
            for r in 0..<rows where k > 0 {
                let row = UnsafeBufferPointer(rebasing: s[(r * cols)..<((r + 1) * cols)])
                for c in topIndices(row, count: k) {
                    chosen.append(r * cols + c)
                    rest[r * cols + c] = -.infinity
                }
            }
        }
        let remainder = count - chosen.count
        if remainder > 0 { chosen += rest.withUnsafeBufferPointer { topIndices($0, count: remainder) } }
        return chosen.sorted()
    }
}

/// TR-PTS (`peft_type: "TR_PTS"`, no PEFT counterpart). Parameters: `density` (the budget as a fraction of all
/// targeted entries, default 0.005) or `budget` (the entry count itself), `fisher_steps` (optimizer steps whose
/// gradients estimate the Fisher information, ≥ 1, default 5), `per_neuron` (spread a layer's share over its
/// output neurons, default true). Tokens: `token_keep_ratio` (fraction of the non-[CLS] tokens kept at each
/// reducing layer, in (0, 1], default 1 = no reduction), `token_reduction_layers` (0-based encoder layers that
/// reduce, default the layers ⌊L/3⌋ and ⌊2L/3⌋), `token_merge` (`"merge"`, the default, fuses the uninformative
/// tokens into one; `"drop"` leaves them out). Token reduction needs a BERT encoder; on a causal decoder a
/// `token_keep_ratio` below 1 is refused.
public enum TRPTSFactory: AdapterMethodFactory {
    public static let peftType = "TR_PTS"
    public static let family = "selective (Fisher-chosen sparse delta, token reduction)"
    /// The shared values' key.
    public static let valuesKey = "base_model.trpts_values"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["density": 0.02, "fisher_steps": 2, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try config.fraction("density", default: 0.005)
        let budget = try config.int("budget", default: 0)
        guard budget >= 0 else { throw GraftError.invalid("\(config.source): 'budget' must be a positive entry count, got \(budget)") }
        let steps = try config.int("fisher_steps", default: 5)
        guard steps >= 1 else { throw GraftError.invalid("\(config.source): 'fisher_steps' must be ≥ 1 (the Fisher information comes from training gradients), got \(steps)") }
        _ = try config.bool("per_neuron", default: true)
        _ = try tokenSettings(config)
    }

    /// `token_keep_ratio`, `token_reduction_layers` (nil: the default) and `token_merge`, checked.
    static func tokenSettings(_ config: AdapterConfig) throws -> (keep: Double, layers: [Int]?, mode: TokenMergeMode) {
        let keep = try config.fraction("token_keep_ratio", default: 1)
        var layers: [Int]? = nil
        switch config.value("token_reduction_layers") {
        case nil, is NSNull: break
        case let list as [Any]:
            layers = try list.map { item in
                guard let n = JSONScalar.integer(item), n >= 0 else {
                    throw GraftError.invalid("\(config.source): 'token_reduction_layers' must list layer indices ≥ 0, got \(JSONScalar.describe(item))")
                }
                return n
            }
        case let other?:
            throw GraftError.invalid("\(config.source): 'token_reduction_layers' must be a list of layer indices, got \(JSONScalar.describe(other))")
        }
        let name = try config.string("token_merge") ?? "merge"
        guard let mode = TokenMergeMode(rawValue: name) else {
            throw GraftError.invalid("\(config.source): 'token_merge' must be \"merge\" or \"drop\", got \"\(name)\"")
        }
        return (keep, layers, mode)
    }

    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let total = layers.reduce(0) { $0 + $1.outFeatures * $1.inFeatures }
        let budget = try config.int("budget", default: 0)
        let n = budget > 0 ? budget : try sparseBudget(density: try config.double("density", default: 0.005), total: total,
                                                        path: "targeted layers", method: "TR-PTS")
        guard n <= total else {
            throw GraftError.invalid("\(config.source): 'budget' \(n) exceeds the \(total) entries of the targeted layers")
        }
        return [(valuesKey, Tensor(zeros: [n]).requiringGrad())]
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let values = shared[valuesKey] else { throw GraftError(.internalError, "TR-PTS values missing") }
        return TRPTSLayer(base: layer, values: values, state: state)
    }

    public static func trainingHook(for adapter: NamedAdapter) throws -> (any AdapterTrainingHook)? {
        let layers = adapter.layers.compactMap { entry in (entry.adapter as? TRPTSLayer).map { (path: entry.path, layer: $0) } }
        return TRPTSAllocator(layers: layers, budget: layers.first?.layer.values.count ?? 0,
                              fisherSteps: try adapter.config.int("fisher_steps", default: 5),
                              perNeuron: try adapter.config.bool("per_neuron", default: true))
    }

    /// The BERT encoder under `root`, if any.
    static func encoder(in root: Module) -> BertModel? {
        if let bert = root as? BertModel { return bert }
        return root.namedModules().lazy.compactMap { $0.module as? BertModel }.first
    }

    /// Installs the token reduction when `token_keep_ratio` < 1: on a BERT encoder only (a causal decoder is
    /// refused by name), one reducing adapter per model.
    public static func didAttach(_ adapter: NamedAdapter, root: Module) throws {
        let (keep, chosen, mode) = try tokenSettings(adapter.config)
        guard keep < 1 else { return }
        let source = adapter.config.source
        guard let bert = encoder(in: root) else {
            throw GraftError(.unsupported, "\(source): TR-PTS token reduction ('token_keep_ratio' \(keep)) drops or merges tokens, which a causal decoder (\(root.typeName)) cannot do: generation needs every position. It runs on BERT encoders only; set 'token_keep_ratio' to 1 here")
        }
        guard bert.tokenReduction == nil else {
            throw GraftError.invalid("\(source): another adapter already reduces this model's tokens; only one TR-PTS adapter with 'token_keep_ratio' < 1 fits a model")
        }
        let depth = bert.layers.count
        let layers = chosen ?? Array(Set([depth / 3, 2 * depth / 3])).sorted()
        if let bad = layers.first(where: { $0 >= depth }) {
            throw GraftError.invalid("\(source): 'token_reduction_layers' lists layer \(bad), but the encoder has layers 0..<\(depth)")
        }
        let state = adapter.state
        let reduction = TokenReduction(keepRatio: keep, layers: Set(layers), mode: mode, isEnabled: { state.isActive })
        bert.tokenReduction = reduction
        for case let allocator as TRPTSAllocator in adapter.adapterHooks { allocator.tokenReduction = reduction }
    }

    public static func willDetach(_ adapter: NamedAdapter, root: Module) {
        guard let bert = encoder(in: root) else { return }
        for case let allocator as TRPTSAllocator in adapter.adapterHooks where bert.tokenReduction === allocator.tokenReduction {
            bert.tokenReduction = nil
        }
    }
}
