import GraftModels
import GraftTensor

/// SVFT (Lingam et al., 2024, singular vectors guided fine-tuning): `ΔW = U M Vᵀ` with `W = U S Vᵀ` the thin
/// SVD of the frozen weight (`U: [out, k]`, `V: [in, k]`, `k = min(out, in)`) and `M: [k, k]` sparse with a
/// fixed pattern; only M's nonzeros train (zero at creation, so the model starts at the base).
///
/// Patterns (`pattern`): `"plain"` — the diagonal (k entries, SVFT^P); `"banded"` — `|i − j| ≤ off_diag`
/// (SVFT^B_d); `"random"` — the diagonal plus `k·off_diag` distinct random off-diagonal entries (SVFT^R_d).
/// Forward: `y = W x + U (M (Vᵀ x))`. Saved keys: `svft_m` `[n]` (the nonzeros) and `svft_indices` `[2, n]`
/// (row, column in M; int32). U and V are recomputed from the base weight on creation, not saved.
public final class SVFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The trainable nonzeros of M.
    public let values: Tensor
    private(set) var rowIndex: [Int32]
    private(set) var colIndex: [Int32]
    /// Frozen `U` `[out, k]` and `Vᵀ` `[k, in]`.
    let u: Tensor, vt: Tensor
    let k: Int

    /// Decomposes the base weight and lays out the pattern; throws naming `path` on a bad pattern or SVD failure.
    public init(base: Linear, pattern: String, offDiagonal: Int, state: AdapterState, path: String) throws {
        self.state = state
        let (u, _, vt) = try svd(base.weight, what: "the weight of '\(path)'")
        self.u = u
        self.vt = vt
        let k = u.shape[1]
        self.k = k
        var rows: [Int32] = [], cols: [Int32] = []
        switch pattern {
        case "plain":
            for i in 0..<k { rows.append(Int32(i)); cols.append(Int32(i)) }
        case "banded":
            for i in 0..<k {
                for j in max(0, i - offDiagonal)...min(k - 1, i + offDiagonal) { rows.append(Int32(i)); cols.append(Int32(j)) }
            }
        case "random":
            let extra = min(k * offDiagonal, k * k - k)
            var picked = Set<Int>()
            while picked.count < extra {
                let p = Int(state.rng.next() % UInt64(k * k))
                if p / k != p % k { picked.insert(p) }
            }
            let all = (Array(picked) + (0..<k).map { $0 * k + $0 }).sorted()
            rows = all.map { Int32($0 / k) }
            cols = all.map { Int32($0 % k) }
        default:
            throw GraftError.invalid("\(path): SVFT pattern '\(pattern)' is not supported (\"plain\", \"banded\", \"random\")")
        }
        rowIndex = rows
        colIndex = cols
        values = Tensor(zeros: [rows.count]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("svft_m", values)] }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] {
        [("svft_indices", rowIndex + colIndex, [2, rowIndex.count])]
    }

    public func loadIntegers(_ name: String, values loaded: [Int64], shape: [Int]) throws {
        guard name == "svft_indices" else { throw GraftError.format("unknown SVFT integer tensor '\(name)'") }
        let n = values.count
        guard shape == [2, n], loaded.count == 2 * n else {
            throw GraftError.format("'svft_indices' has shape \(shape), expected [2, \(n)]")
        }
        if let bad = loaded.first(where: { $0 < 0 || $0 >= Int64(k) }) {
            throw GraftError.format("'svft_indices' entry \(bad) is outside 0..<\(k)")
        }
        rowIndex = loaded.prefix(n).map { Int32($0) }
        colIndex = loaded.suffix(n).map { Int32($0) }
    }

    /// M as a dense `[k, k]`, recorded.
    private func m() -> Tensor { denseFromSparse(values, rowIndex: rowIndex, colIndex: colIndex, rows: k, cols: k) }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        y + linear(linear(linear(x, vt), m()), u)
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { matmul(matmul(u, m()), vt) } }
}

/// SVFT (`peft_type: "SVFT"`, no PEFT counterpart): `pattern` (`"plain"` default, `"banded"`, `"random"`),
/// `off_diag` (band half-width / random entries per row, default 2; ignored by `"plain"`).
public enum SVFTFactory: AdapterMethodFactory {
    public static let peftType = "SVFT"
    public static let family = "weight-delta (SVD basis, sparse core)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["pattern": "banded", "off_diag": 2, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let pattern = try config.string("pattern") ?? "plain"
        guard ["plain", "banded", "random"].contains(pattern) else {
            throw GraftError.invalid("\(config.source): SVFT 'pattern' must be \"plain\", \"banded\" or \"random\", got '\(pattern)'")
        }
        let d = try config.int("off_diag", default: 2)
        guard d >= 0 else { throw GraftError.invalid("\(config.source): 'off_diag' must be ≥ 0, got \(d)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try SVFTLayer(base: layer, pattern: try config.string("pattern") ?? "plain", offDiagonal: try config.int("off_diag", default: 2),
                      state: state, path: "\(config.source): \(path)")
    }
}
