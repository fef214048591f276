import GraftModels
import GraftTensor

/// SpIEL (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to Large Language Models"), its accumulated-gradient
/// variant: a sparse delta over an index array (a ``SparseDelta`` of exactly `⌈density · out · in⌉` entries,
/// zero at the start, at random positions), `y = W x + b + Δ x`. Every `update_interval` optimizer steps it drops
/// the `⌊drop_fraction · n⌋` entries with the smallest |δ| and regrows as many at the positions with the largest
/// accumulated gradient |Σ ∂L/∂W| — so the number of trainable entries never changes.
///
/// The regrowth scores come, as in the paper, from a few candidates rather than a dense ∂L/∂W: while training,
/// `⌈candidate_ratio · n⌉` random positions outside the active set ride along in the forward as zero-valued
/// sparse entries (a second ``SparseDelta`` outside the optimizer), whose gathered gradients are summed after every
/// backward through ``AdapterTrainingHook``; after each update the candidates are drawn anew. Nothing of the size
/// of W is ever formed. A regrown entry starts at 0 and keeps the optimizer moments of the slot it reuses (the
/// trainer's AdamW state is not reachable from the hook); the candidates and their sums are not saved, so a
/// resumed run starts a fresh accumulation. Keys `spiel_values` `[n]`, `spiel_indices` `[2, n]` (row, column;
/// int32; Graft's, PEFT has no SpIEL).
public final class SpIELLayer: LinearAdapterMethod, AdapterTrainingHook {
    public let state: AdapterState
    /// The active entries (the trainable budget).
    public let delta: SparseDelta
    /// Optimizer steps between drop/regrow rounds.
    public let updateInterval: Int
    /// Fraction of the entries replaced per round.
    public let dropFraction: Double
    /// Candidate positions scored per round.
    public let candidateCount: Int
    /// Zero-valued candidate entries whose gradients score regrowth (nil when the active set fills W).
    private(set) var candidates: SparseDelta?
    /// Σ ∂L/∂W at each candidate since the last round.
    private(set) var accumulated: [Float] = []
    /// Drop/regrow rounds done.
    public private(set) var rounds = 0

    /// Creates the layer at random positions; throws naming `path` when the density gives no entry or too many.
    public init(base: Linear, density: Double, updateInterval: Int, dropFraction: Double, candidateRatio: Double,
                state: AdapterState, path: String) throws {
        let total = base.outFeatures * base.inFeatures
        let n = try sparseBudget(density: density, total: total, path: path, method: "SpIEL")
        self.state = state
        self.updateInterval = updateInterval
        self.dropFraction = dropFraction
        candidateCount = Int(min(Double(total - n), (candidateRatio * Double(n)).rounded(.up)))
        delta = SparseDelta(rows: base.outFeatures, cols: base.inFeatures,
                            positions: Self.sample(n, from: total, excluding: [], rng: &state.rng).sorted())
        drawCandidates()
    }

    /// `count` distinct positions in `0..<total` not in `excluded`, at random.
    static func sample(_ count: Int, from total: Int, excluding excluded: Set<Int>, rng: inout GraftRNG) -> [Int] {
        guard count > 0 else { return [] }
        if 2 * (count + excluded.count) > total {
            // Dense regime: shuffle the free positions (only when the budget is close to the whole matrix).
            var free = (0..<total).filter { !excluded.contains($0) }
            for i in 0..<min(count, free.count) { free.swapAt(i, i + Int(rng.next() % UInt64(free.count - i))) }
            return Array(free.prefix(count))
        }
        var picked = Set<Int>(), order: [Int] = []
        while order.count < count {
            let p = Int(rng.next() % UInt64(total))
            if !excluded.contains(p), picked.insert(p).inserted { order.append(p) }
        }
        return order
    }

    private func drawCandidates() {
        let positions = Self.sample(candidateCount, from: delta.rows * delta.cols, excluding: Set(delta.positions), rng: &state.rng)
        candidates = positions.isEmpty ? nil : SparseDelta(rows: delta.rows, cols: delta.cols, positions: positions)
        accumulated = [Float](repeating: 0, count: positions.count)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("spiel_values", delta.values)] }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] { [delta.indexBuffer("spiel_indices")] }

    public func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws {
        guard name == "spiel_indices" else { throw GraftError.format("unknown SpIEL integer tensor '\(name)'") }
        try delta.loadIndices(name, values: values, shape: shape)
        drawCandidates()
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        var out = y + delta.apply(x)
        if state.isTraining, let c = candidates { out = out + c.apply(x) }
        return out
    }

    public func deltaWeight(base: Linear) -> Tensor? { delta.dense() }

    /// Adds the candidates' gathered gradients to their sums.
    public func afterBackward(step: Int) {
        guard let c = candidates, let g = c.values.grad else { return }
        for i in 0..<accumulated.count { accumulated[i] += g.pointer[i] }
        c.values.grad = nil
    }

    /// Every `update_interval` steps (not after the last): drop the smallest |δ|, regrow at the best candidates.
    public func didUpdate(step: Int, totalSteps: Int) {
        guard step % updateInterval == 0, step < totalSteps else { return }
        dropAndRegrow()
    }

    /// One round: the `⌊drop_fraction · n⌋` smallest |δ| (ties to the lower slot) move to the candidates with
    /// the largest |accumulated gradient| (ties to the earlier candidate), at value 0; then new candidates.
    public func dropAndRegrow() {
        guard let c = candidates else { return }
        let k = min(Int(dropFraction * Double(delta.count)), c.count)
        if k > 0 {
            let pv = delta.values.pointer
            let slots = (0..<delta.count).sorted { abs(pv[$0]) != abs(pv[$1]) ? abs(pv[$0]) < abs(pv[$1]) : $0 < $1 }.prefix(k)
            let scores = accumulated.map(abs)
            let grown = scores.withUnsafeBufferPointer { topIndices($0, count: k) }
            let candidatePositions = c.positions
            delta.move(slots: Array(slots), to: grown.map { candidatePositions[$0] })
        }
        rounds += 1
        drawCandidates()
    }
}

/// SpIEL (`peft_type: "SPIEL"`, no PEFT counterpart): `density` (fraction of each layer's entries trained,
/// default 0.01), `update_interval` (optimizer steps between drop/regrow rounds, default 10), `drop_fraction`
/// (share of the entries replaced per round, in [0, 1], default 0.1), `candidate_ratio` (candidates scored per
/// round, as a multiple of the entry count, > 0, default 1).
public enum SpIELFactory: AdapterMethodFactory {
    public static let peftType = "SPIEL"
    public static let family = "selective (sparse, drop and regrow)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["density": 0.02, "update_interval": 5, "drop_fraction": 0.1, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try config.fraction("density", default: 0.01)
        let interval = try config.int("update_interval", default: 10)
        guard interval >= 1 else { throw GraftError.invalid("\(config.source): 'update_interval' must be ≥ 1, got \(interval)") }
        let drop = try config.double("drop_fraction", default: 0.1)
        guard drop >= 0, drop <= 1 else { throw GraftError.invalid("\(config.source): 'drop_fraction' must be in [0, 1], got \(drop)") }
        let ratio = try config.double("candidate_ratio", default: 1)
        guard ratio > 0, ratio.isFinite else { throw GraftError.invalid("\(config.source): 'candidate_ratio' must be positive, got \(ratio)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try SpIELLayer(base: layer, density: try config.double("density", default: 0.01),
                       updateInterval: try config.int("update_interval", default: 10),
                       dropFraction: try config.double("drop_fraction", default: 0.1),
                       candidateRatio: try config.double("candidate_ratio", default: 1),
                       state: state, path: "\(config.source): \(path)")
    }
}
