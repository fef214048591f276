import GraftModels
import GraftTensor

/// LoSiA (2025, subnet localization and optimization): each target layer trains a dense sub-network of its weight —
/// `k_r` of its rows crossed with `k_c` of its columns (`k = ⌈rank_factor · size⌉`) — chosen from the gradient, and
/// re-localizes it periodically:
///
/// - for the first `score_steps` optimizer steps, and for `score_steps` steps before each re-localization, the layer
///   adds a dense zero probe `P` to its weight and accumulates `|∂L/∂P|` (the gradient of W) after every backward,
///   through ``AdapterTrainingHook``;
/// - localization keeps the `k_r` rows with the largest summed gradient magnitude, then the `k_c` columns with the
///   largest sum over those rows (a greedy reading of the paper's gradient-sparsity analysis; our choice);
/// - at the localization after step `score_steps` and at every re-localization (every `relocalize_every` steps),
///   after the optimizer update, the trained sub-matrix is folded into a frozen accumulated delta, the new
///   sub-matrix starts at zero and its optimizer state is reset (through
///   ``AdapterTrainingHook/takeParametersToReset()``), so the function is unchanged by the move.
///
/// `y = W x + b + (D + S) x`, `D` the accumulated delta `[out, in]` (frozen), `S` the sub-matrix scattered to its
/// rows and columns. Before the first localization `S` sits on the first `k_r` rows and `k_c` columns.
/// Graft keeps the base weights frozen, so the update lives in `D + S` rather than in W as in the paper.
public final class LoSiALayer: LinearAdapterMethod, AdapterTrainingHook {
    public let state: AdapterState
    /// The trained sub-matrix `[k_r, k_c]`.
    public let sub: Tensor
    /// Earlier sub-networks' updates `[out, in]`, frozen.
    public let accumulated: Tensor
    /// The sub-network's rows and columns (sorted).
    public private(set) var rows: [Int32], columns: [Int32]
    /// Whether the sub-network has been chosen (or loaded).
    public private(set) var located = false
    let outFeatures: Int, inFeatures: Int
    let scoreSteps: Int, period: Int
    private var step = 0
    private var probe: Tensor?
    private var scores: [Float]?
    private var resetRequested = false

    /// Creates the layer; throws naming `path` when `rankFactor` selects no row or column.
    public init(base: Linear, rankFactor: Double, scoreSteps: Int, period: Int, state: AdapterState, path: String) throws {
        let kr = Int((rankFactor * Double(base.outFeatures)).rounded(.up)), kc = Int((rankFactor * Double(base.inFeatures)).rounded(.up))
        guard kr >= 1, kc >= 1, kr <= base.outFeatures, kc <= base.inFeatures else {
            throw GraftError.invalid("\(path): LoSiA rank_factor \(rankFactor) selects \(kr)×\(kc) of a \(base.outFeatures)×\(base.inFeatures) layer")
        }
        self.state = state
        outFeatures = base.outFeatures
        inFeatures = base.inFeatures
        self.scoreSteps = scoreSteps
        self.period = period
        sub = Tensor(zeros: [kr, kc]).requiringGrad()
        accumulated = Tensor(zeros: [base.outFeatures, base.inFeatures])
        rows = (0..<kr).map(Int32.init)
        columns = (0..<kc).map(Int32.init)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("losia_sub", sub)] }
    public var savedBuffers: [(name: String, tensor: Tensor)] { [("losia_delta", accumulated)] }

    /// Rows then columns; −1 before the first localization (the placeholder first rows and columns; a checkpoint
    /// taken then resumes the scoring).
    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        [("losia_rows", located ? rows : rows.map { _ in -1 }, [rows.count]),
         ("losia_columns", located ? columns : columns.map { _ in -1 }, [columns.count])]
    }

    public func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws {
        let (count, limit) = name == "losia_rows" ? (rows.count, outFeatures) : (columns.count, inFeatures)
        guard name == "losia_rows" || name == "losia_columns" else { throw GraftError.format("unknown LoSiA integer tensor '\(name)'") }
        guard shape == [count], values.count == count else { throw GraftError.format("'\(name)' has shape \(shape), expected [\(count)]") }
        if values.allSatisfy({ $0 == -1 }) { return }
        guard values.allSatisfy({ $0 >= 0 && $0 < Int64(limit) }), Set(values).count == count else {
            throw GraftError.format("'\(name)' holds an index outside 0..<\(limit) or a repeated one")
        }
        if name == "losia_rows" { rows = values.map { Int32($0) } } else { columns = values.map { Int32($0) } }
        located = true
    }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {
        guard name == "losia_delta" else { throw GraftError.format("unexpected LoSiA buffer '\(name)'") }
        try copyParameter(name, into: accumulated, from: tensor)
    }

    /// `S` scattered to `[out, in]`, recorded.
    func scattered() -> Tensor {
        var r: [Int32] = [], c: [Int32] = []
        r.reserveCapacity(sub.count)
        c.reserveCapacity(sub.count)
        for i in rows { for j in columns { r.append(i); c.append(j) } }
        return denseFromSparse(sub, rowIndex: r, colIndex: c, rows: outFeatures, cols: inFeatures)
    }

    /// Whether the optimizer step after `step` gathers gradients for a (re-)localization.
    var scoring: Bool {
        guard located else { return true }
        let next = (step / period + 1) * period
        return next - (step + 1) < scoreSteps
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        var delta = accumulated + scattered()
        if scoring, state.isTraining {
            let p = probe ?? Tensor(zeros: [outFeatures, inFeatures]).requiringGrad()
            probe = p
            delta = delta + p
        }
        return y + linear(x, delta)
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { accumulated + scattered() } }

    public func afterBackward(step: Int) {
        guard let p = probe, let g = p.grad else { return }
        var acc = scores ?? [Float](repeating: 0, count: p.count)
        let pg = g.pointer
        acc.withUnsafeMutableBufferPointer { a in for i in 0..<a.count { a[i] += abs(pg[i]) } }
        scores = acc
        p.grad = nil
    }

    public func didUpdate(step: Int, totalSteps: Int) {
        self.step = step
        guard scores != nil, located ? step % period == 0 : step >= scoreSteps else { return }
        // Fold the trained sub-matrix into the frozen delta, then move.
        let folded = withNoGrad { scattered() }
        for i in 0..<accumulated.count { accumulated.pointer[i] += folded.pointer[i] }
        for i in 0..<sub.count { sub.pointer[i] = 0 }
        localize()
        resetRequested = true
    }

    public func takeParametersToReset() -> [Tensor] {
        defer { resetRequested = false }
        return resetRequested ? [sub] : []
    }

    /// Chooses the rows and columns from the accumulated gradient magnitudes (ties to the lower index).
    func localize() {
        guard let acc = scores else { return }
        var rowSum = [Float](repeating: 0, count: outFeatures)
        for r in 0..<outFeatures { for c in 0..<inFeatures { rowSum[r] += acc[r * inFeatures + c] } }
        let newRows = Self.top(rows.count, of: rowSum)
        var colSum = [Float](repeating: 0, count: inFeatures)
        for r in newRows { for c in 0..<inFeatures { colSum[c] += acc[Int(r) * inFeatures + c] } }
        rows = newRows
        columns = Self.top(columns.count, of: colSum)
        located = true
        probe = nil
        scores = nil
    }

    static func top(_ k: Int, of values: [Float]) -> [Int32] {
        Array(values.indices.sorted { values[$0] != values[$1] ? values[$0] > values[$1] : $0 < $1 }.prefix(k)).sorted().map(Int32.init)
    }
}

/// LoSiA (`peft_type: "LOSIA"`, no PEFT counterpart): `rank_factor` (the fraction of rows and of columns in the
/// sub-network, default 0.125), `score_steps` (optimizer steps whose gradients choose it, default 1),
/// `relocalize_every` (steps between re-localizations, default 50). Keys per module: `losia_sub` `[k_r, k_c]`,
/// `losia_delta` `[out, in]`, int32 `losia_rows` `[k_r]` and `losia_columns` `[k_c]`.
public enum LoSiAFactory: AdapterMethodFactory {
    public static let peftType = "LOSIA"
    public static let family = "selective (gradient-localized row × column sub-network)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["rank_factor": 0.125, "score_steps": 1, "relocalize_every": 4, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try config.fraction("rank_factor", default: 0.125)
        let s = try config.int("score_steps", default: 1), t = try config.int("relocalize_every", default: 50)
        guard s >= 1 else { throw GraftError.invalid("\(config.source): 'score_steps' must be ≥ 1, got \(s)") }
        guard t > s else { throw GraftError.invalid("\(config.source): 'relocalize_every' must exceed score_steps (\(s)), got \(t)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try LoSiALayer(base: layer, rankFactor: try config.double("rank_factor", default: 0.125),
                       scoreSteps: try config.int("score_steps", default: 1), period: try config.int("relocalize_every", default: 50),
                       state: state, path: "\(config.source): \(path)")
    }
}
