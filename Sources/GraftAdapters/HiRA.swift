import GraftIO
import GraftModels
import GraftTensor

/// HiRA (Huang et al., 2025): a high-rank update as the Hadamard product of the frozen weight with a low-rank
/// matrix, `ΔW = W ∘ (B A)` with `A: [r, in]`, `B: [out, r]`. The forward never forms `B A`:
/// `(W ∘ B A) x = Σₖ B[:, k] ⊙ W (A[k, :] ⊙ x)` (``hadamardLowRank(_:weight:down:up:)``). PEFT keys `hira_A`,
/// `hira_B`. PEFT merges `W + W₀ ∘ (B A)`, which is this ΔW.
public final class HiRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[r, in]`.
    public let a: Tensor
    /// `[out, r]` (zero at PEFT's default initialization: ΔW = 0).
    public let b: Tensor
    let dropoutProbability: Float

    init(base: Linear, rank: Int, initWeights: HiRAInit, dropout: Float, state: AdapterState) {
        self.state = state
        dropoutProbability = dropout
        switch initWeights {
        case .kaiming:
            a = kaimingUniform(rank, base.inFeatures, rng: &state.rng).requiringGrad()
            b = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        case .gaussian:
            a = Tensor.randomNormal([rank, base.inFeatures], std: 1 / Float(rank), rng: &state.rng).requiringGrad()
            b = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
        case .random:
            a = Tensor.randomNormal([rank, base.inFeatures], rng: &state.rng).requiringGrad()
            b = Tensor.randomNormal([base.outFeatures, rank], rng: &state.rng).requiringGrad()
        }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("hira_A", a), ("hira_B", b)] }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        y + hadamardLowRank(dropout(x, p: dropoutProbability, state: state), weight: layer.weight, down: b, up: a).reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { base.weight * matmul(b, a) } }
}

/// HiRA's `init_weights`: `true` (A Kaiming-uniform, B zero), `"gaussian"` (A ~ N(0, 1/r²), B zero) or `false`
/// (both N(0, 1), as `torch.randn`).
enum HiRAInit {
    case kaiming, gaussian, random
}

/// `(W ∘ (D U)) x` for `x: [..., in]`, frozen `W: [out, in]`, `D: [out, r]`, `U: [r, in]`, as `[rows, out]`,
/// without forming `D U` or `W ∘ D U`: the `r` copies `U[k, :] ⊙ x` go through one GEMM with `W`, and the
/// results are weighted by `D[:, k]` and summed. Backward runs the transposed GEMM once and reduces on the
/// buffers; `W` gets no gradient (it is the frozen base weight).
func hadamardLowRank(_ x: Tensor, weight: Tensor, down d: Tensor, up u: Tensor) -> Tensor {
    let outF = weight.shape[0], inF = weight.shape[1], r = u.shape[0]
    let n = x.count / max(inF, 1)
    let scaled = Tensor(zeros: [n * r, inF])
    let px = x.pointer, pu = u.pointer, ps = scaled.pointer
    parallelFor(n, grain: 64) { rows in
        for i in rows {
            for k in 0..<r {
                let dst = ps + (i * r + k) * inF, src = px + i * inF, uk = pu + k * inF
                for j in 0..<inF { dst[j] = src[j] * uk[j] }
            }
        }
    }
    let z = Tensor(zeros: [n * r, outF])
    sgemm(transA: false, transB: true, m: n * r, n: outF, k: inF, a: ps, b: weight.pointer, c: z.pointer)
    let out = Tensor(zeros: [n, outF])
    let pz = z.pointer, pd = d.pointer, po = out.pointer
    parallelFor(n, grain: 64) { rows in
        for i in rows {
            let dst = po + i * outF
            for k in 0..<r {
                let zk = pz + (i * r + k) * outF
                for o in 0..<outF { dst[o] += zk[o] * pd[o * r + k] }
            }
        }
    }
    return Tensor.recordingCustomOp(out, inputs: [x, d, u]) { g in
        // Pointers from the tensors the closure holds (z is kept alive by this capture).
        let pg = g.pointer, pz = z.pointer, px = x.pointer, pu = u.pointer, pd = d.pointer
        var dd: Tensor? = nil
        if d.requiresGrad {
            let t = Tensor(zeros: d.shape)
            let pt = t.pointer
            for i in 0..<n {
                for k in 0..<r {
                    let zk = pz + (i * r + k) * outF, gi = pg + i * outF
                    for o in 0..<outF { pt[o * r + k] += gi[o] * zk[o] }
                }
            }
            dd = t
        }
        guard x.requiresGrad || u.requiresGrad else { return [nil, dd, nil] }
        // dZ[i, k, o] = g[i, o] D[o, k]; dS = dZ W.
        let dz = Tensor(zeros: [n * r, outF])
        let pdz = dz.pointer
        parallelFor(n, grain: 64) { rows in
            for i in rows {
                for k in 0..<r {
                    let dst = pdz + (i * r + k) * outF, gi = pg + i * outF
                    for o in 0..<outF { dst[o] = gi[o] * pd[o * r + k] }
                }
            }
        }
        let ds = Tensor(zeros: [n * r, inF])
        sgemm(transA: false, transB: false, m: n * r, n: inF, k: outF, a: pdz, b: weight.pointer, c: ds.pointer)
        let pds = ds.pointer
        var dx: Tensor? = nil, du: Tensor? = nil
        if x.requiresGrad {
            let t = Tensor(zeros: x.shape)
            let pt = t.pointer
            parallelFor(n, grain: 64) { rows in
                for i in rows {
                    for k in 0..<r {
                        let src = pds + (i * r + k) * inF, uk = pu + k * inF, dst = pt + i * inF
                        for j in 0..<inF { dst[j] += src[j] * uk[j] }
                    }
                }
            }
            dx = t
        }
        if u.requiresGrad {
            let t = Tensor(zeros: u.shape)
            let pt = t.pointer
            for i in 0..<n {
                for k in 0..<r {
                    let src = pds + (i * r + k) * inF, xi = px + i * inF, dst = pt + k * inF
                    for j in 0..<inF { dst[j] += src[j] * xi[j] }
                }
            }
            du = t
        }
        return [dx, dd, du]
    }
}

/// HiRA (`peft_type: "HIRA"`): `r` (with `rank_pattern`), `hira_dropout`, `init_weights`.
public enum HiRAFactory: AdapterMethodFactory {
    public static let peftType = "HIRA"
    public static let family = "weight-delta (Hadamard high rank)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 32)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        let p = try config.double("hira_dropout", default: 0)
        guard p >= 0, p < 1 else { throw GraftError.invalid("\(config.source): 'hira_dropout' must be in [0, 1), got \(p)") }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
        _ = try initMode(config)
    }

    static func initMode(_ config: AdapterConfig) throws -> HiRAInit {
        switch config.value("init_weights") {
        case nil: return .kaiming
        case let s as String where s.lowercased() == "gaussian": return .gaussian
        case let v?:
            guard let flag = JSONScalar.bool(v) else {
                throw GraftError.invalid("\(config.source): 'init_weights' must be true, false or \"gaussian\", got \(v)")
            }
            return flag ? .kaiming : .random
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let r = try config.patternSize("rank_pattern", path: path, default: try config.int("r", default: 32))
        guard r > 0 else { throw GraftError.invalid("\(config.source): rank for '\(path)' must be positive, got \(r)") }
        return HiRALayer(base: layer, rank: r, initWeights: try initMode(config),
                         dropout: Float(try config.double("hira_dropout", default: 0)), state: state)
    }
}
