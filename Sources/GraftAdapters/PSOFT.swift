import Foundation
import GraftModels
import GraftTensor

/// PSOFT (Wu et al.; seed paper #28): orthogonal fine-tuning inside the weight's principal subspace. With the top-`r`
/// SVD `W ≈ U_r S_r V_rᵀ`, fixed `A = V_rᵀ` `[r, in]` and `B = U_r S_r / s` `[out, r]` (`psoft_init`; `pissa_init`
/// splits `√(S_r/s)` between them), `ΔW = s · B (R − I) A` with `R = diag(b) · Cayley(Q) · diag(a)`, `Q` skew-symmetric
/// from its `r(r−1)/2` upper-triangle entries, `Cayley(Q) = (I + Q)(I − Q)⁻¹` (or its Neumann series), `s = alpha / r`.
/// The forward runs `s ((x Aᵀ) Rᵀ − x Aᵀ) Bᵀ`. A and B are not saved: they are recomputed from the base weight's SVD,
/// taken as LAPACK factors the `[out, in]` matrix (as PyTorch does). PEFT keys `psoft_R.weight` `[r(r−1)/2]`
/// (`[r, r]` without `psoft_orth`), `psoft_R.vector_a`, `psoft_R.vector_b` `[r]`.
public final class PSOFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The skew-symmetric generator's upper triangle `[r(r−1)/2]`, or the free `[r, r]` matrix without `psoft_orth`.
    public let weight: Tensor
    /// Column and row magnitudes `[r]` (`psoft_mag_a`, `psoft_mag_b`).
    public let vectorA: Tensor?, vectorB: Tensor?
    /// The fixed principal factors.
    let a: Tensor, b: Tensor
    let rank: Int, orthogonal: Bool
    let neumannTerms: Int?, neumannEps: Float?
    let scaling: Float
    let dropoutProbability: Float

    init(base: Linear, rank requested: Int, alpha: Float, orthogonal: Bool, magA: Bool, magB: Bool, pissaInit: Bool,
         neumannTerms: Int?, neumannEps: Float?, initWeights: Bool, dropout: Float, state: AdapterState, path: String) throws {
        self.state = state
        // LAPACK sees the row-major Wᵀ buffer as W in column-major order, as PyTorch's svd passes it.
        let (u, s, vt) = try svd(base.weight.transposed(0, 1), what: path)
        let r = min(requested, s.count)
        rank = r
        self.orthogonal = orthogonal
        self.neumannTerms = neumannTerms
        self.neumannEps = neumannEps
        scaling = alpha / Float(r)
        dropoutProbability = dropout
        let (inF, outF) = (base.inFeatures, base.outFeatures)
        // W = vtᵀ diag(s) uᵀ: PyTorch's U is vtᵀ, its Vh is uᵀ.
        let aT = Tensor(zeros: [r, inF]), bT = Tensor(zeros: [outF, r])
        for i in 0..<r {
            let scaled = s.pointer[i] / scaling
            let (left, right) = pissaInit ? (scaled.squareRoot(), scaled.squareRoot()) : (Float(1), scaled)
            for j in 0..<inF { aT.pointer[i * inF + j] = left * u.pointer[j * u.shape[1] + i] }
            for o in 0..<outF { bT.pointer[o * r + i] = right * vt.pointer[i * outF + o] }
        }
        a = aT
        b = bT
        if orthogonal {
            weight = (initWeights ? Tensor(zeros: [r * (r - 1) / 2]) : Tensor.randomNormal([r * (r - 1) / 2], std: 0.1, rng: &state.rng)).requiringGrad()
        } else {
            let eye = Tensor(shape: [r, r], values: (0..<(r * r)).map { $0 % (r + 1) == 0 ? 1 : 0 })
            weight = (initWeights ? eye : withNoGrad { eye + Tensor.randomNormal([r, r], std: 0.1, rng: &state.rng) }).requiringGrad()
        }
        vectorA = magA ? Tensor(repeating: 1, shape: [r]).requiringGrad() : nil
        vectorB = magB ? Tensor(repeating: 1, shape: [r]).requiringGrad() : nil
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("psoft_R.weight", weight)] + (vectorA.map { [("psoft_R.vector_a", $0)] } ?? []) + (vectorB.map { [("psoft_R.vector_b", $0)] } ?? [])
    }

    /// The `[r, r]` transform R, recorded for autograd.
    func rotation() -> Tensor {
        let r = rank
        let eye = Tensor(shape: [r, r], values: (0..<(r * r)).map { $0 % (r + 1) == 0 ? 1 : 0 })
        var m: Tensor
        if !orthogonal {
            m = weight
        } else {
            // Q = U − Uᵀ with U's strict upper triangle filled row by row (torch.triu_indices order).
            var pairs: [(Int, Int)] = []
            for i in 0..<r { for j in (i + 1)..<max(r, i + 1) { pairs.append((i, j)) } }
            let rows = pairs.map { Int32($0.0) }, cols = pairs.map { Int32($0.1) }
            let upper = denseFromSparse(weight, rowIndex: rows, colIndex: cols, rows: r, cols: r)
            var q = upper - upper.transposed(0, 1)
            if let terms = neumannTerms {
                if let eps = neumannEps {
                    let norm = withNoGrad { q.scalars.reduce(0) { $0 + $1 * $1 } }.squareRoot()
                    if norm.isFinite, norm > eps { q = q * reciprocal(sqrt(sum(q * q)) + Tensor(scalar: 1e-12)) * eps }
                }
                m = eye
                if terms > 1 {
                    m = m + q * 2
                    if terms > 2 {
                        var power = matmul(q, q)
                        m = m + power * 2
                        if terms > 4 { for _ in 3..<(terms - 1) { power = matmul(power, q); m = m + power * 2 } }
                        power = matmul(power, q)
                        m = m + power
                    }
                }
            } else {
                m = matmul(eye + q, inverse(eye - q))
            }
        }
        if let vb = vectorB { m = vb.reshaped([r, 1]) * m }
        if let va = vectorA { m = m * va.reshaped([1, r]) }
        return m
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let xa = linear(dropout(x, p: dropoutProbability, state: state), a)
        return y + linear(linear(xa, rotation()) - xa, b) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let eye = Tensor(shape: [rank, rank], values: (0..<(rank * rank)).map { $0 % (rank + 1) == 0 ? 1 : 0 })
            return matmul(matmul(b, rotation() - eye), a) * scaling
        }
    }
}

/// PSOFT (`peft_type: "PSOFT"`): `r`, `psoft_alpha`, `psoft_dropout`, `ab_svd_init`, `psoft_orth`, `psoft_mag_a`,
/// `psoft_mag_b`, `use_cayley_neumann`, `num_cayley_neumann_terms`, `cayley_neumann_eps`, `init_weights`;
/// `psoft_svd: "full"` (the randomized `"lowrank"` SVD is rejected).
public enum PSOFTFactory: AdapterMethodFactory {
    public static let peftType = "PSOFT"
    public static let family = "multiplicative/orthogonal (principal subspace)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "psoft_alpha": 8, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 32)
        guard r > 1 else { throw GraftError.invalid("\(config.source): 'r' must be at least 2, got \(r)") }
        let svdMode = try config.string("psoft_svd") ?? "full"
        guard svdMode == "full" else {
            throw GraftError(.unsupported, "\(config.source): 'psoft_svd' = \"\(svdMode)\" is not supported (PyTorch's randomized svd_lowrank is not reproduced; use \"full\")")
        }
        config.acknowledge("psoft_svd_lowrank_niter", "random_seed")  // Only read by the rejected "lowrank" mode.
        let initMode = try config.string("ab_svd_init") ?? "psoft_init"
        guard ["psoft_init", "pissa_init"].contains(initMode) else {
            throw GraftError.invalid("\(config.source): 'ab_svd_init' must be \"psoft_init\" or \"pissa_init\", got \"\(initMode)\"")
        }
        let p = try config.double("psoft_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'psoft_dropout' must be in [0, 1), got \(p)") }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
        guard try config.int("num_cayley_neumann_terms", default: 5) >= 1 else {
            throw GraftError.invalid("\(config.source): 'num_cayley_neumann_terms' must be positive")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let neumann = try config.bool("use_cayley_neumann", default: false)
        let terms = try config.int("num_cayley_neumann_terms", default: 5)
        let epsValue = config.value("cayley_neumann_eps")
        let eps = epsValue == nil || epsValue is NSNull ? nil : Float(try config.double("cayley_neumann_eps", default: 0))
        return try PSOFTLayer(base: layer, rank: try config.int("r", default: 32), alpha: Float(try config.double("psoft_alpha", default: 32)),
                              orthogonal: try config.bool("psoft_orth", default: true), magA: try config.bool("psoft_mag_a", default: true),
                              magB: try config.bool("psoft_mag_b", default: true),
                              pissaInit: (try config.string("ab_svd_init") ?? "psoft_init") == "pissa_init",
                              neumannTerms: neumann ? terms : nil, neumannEps: neumann ? eps : nil,
                              initWeights: try config.bool("init_weights", default: true),
                              dropout: Float(try config.double("psoft_dropout", default: 0)), state: state,
                              path: "\(config.source): \(path)")
    }
}
