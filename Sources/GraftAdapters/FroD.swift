import Foundation
import GraftModels
import GraftTensor

/// FRoD: the weight re-expressed in a basis `V` `[in, in]` shared by every layer of the same role (`self_query`, …),
/// `W = U diag(λ) Vᵀ` with `U`'s columns the normalized columns of `W V⁻ᵀ` and `λ` their norms, then trained as
/// `W' = U (S + diag λ) Vᵀ` with λ and a sparse off-diagonal `S` (fixed random positions, `sparse_rate`) trainable.
/// The forward replaces the base product: `y = U((x V) Sᵀ + (x V) ⊙ λ) + b` (never forming W'). V and S's positions
/// are model-level buffers; `U` is recomputed from the base weight and V (in Float64, as PEFT) whenever V changes.
/// PEFT keys `frod_lambda_l` `[in]`, `frod_lambda_s_values` `[nnz]`, and `base_model.frod_V.<role>`,
/// `base_model.frod_s_indices.<role>` (int64 `[2, nnz]`), `base_model.frod_s_size.<role>` (int64 `[2]`).
public final class FroDLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The trainable diagonal `[in]` (the column norms of `W V⁻ᵀ` at initialization).
    public let lambda: Tensor
    /// The trainable off-diagonal values `[nnz]`.
    public let values: Tensor
    let basis: Tensor, indices: Tensor
    let dropoutProbability: Float
    let inFeatures: Int, outFeatures: Int
    /// U `[out, in]` and the V it was computed from.
    private var cachedU: Tensor?
    private var cachedBasis: [Float] = []
    private let baseWeight: [Float]

    init(base: Linear, basis: Tensor, indices: Tensor, initWeights: Bool, dropout: Float, state: AdapterState) throws {
        self.state = state
        self.basis = basis
        self.indices = indices
        dropoutProbability = dropout
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        baseWeight = base.weight.scalars
        let nnz = indices.count / 2
        values = (initWeights ? Tensor(zeros: [nnz]) : Tensor.randomNormal([nnz], std: 0.1, rng: &state.rng)).requiringGrad()
        let (_, norms) = try FroDLayer.decompose(weight: baseWeight, basis: basis.scalars, out: outFeatures, in: inFeatures)
        lambda = Tensor(shape: [inFeatures], values: initWeights ? norms : norms.map { $0 + 0.1 * state.rng.nextNormal() }).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("frod_lambda_l", lambda), ("frod_lambda_s_values", values)] }

    /// `W V⁻ᵀ` solved in Float64 with partial pivoting, split into unit columns `U` and their norms.
    static func decompose(weight: [Float], basis: [Float], out: Int, in n: Int) throws -> (u: [Float], norms: [Float]) {
        // Solve V X = Wᵀ (X = V⁻¹ Wᵀ, n × out) by Gaussian elimination with partial pivoting; W V⁻ᵀ = Xᵀ.
        var m = basis.map(Double.init)
        var x = [Double](repeating: 0, count: n * out)
        for o in 0..<out { for j in 0..<n { x[j * out + o] = Double(weight[o * n + j]) } }
        var singular: Int? = nil
        m.withUnsafeMutableBufferPointer { mb in
            x.withUnsafeMutableBufferPointer { xb in
                guard let pm = mb.baseAddress, let px = xb.baseAddress else { return }
                for col in 0..<n {
                    var pivot = col
                    for r in (col + 1)..<max(n, col + 1) where abs(pm[r * n + col]) > abs(pm[pivot * n + col]) { pivot = r }
                    guard abs(pm[pivot * n + col]) > 1e-300 else { singular = col; return }
                    if pivot != col {
                        for k in 0..<n { swap(&pm[col * n + k], &pm[pivot * n + k]) }
                        for k in 0..<out { swap(&px[col * out + k], &px[pivot * out + k]) }
                    }
                    let inv = 1 / pm[col * n + col]
                    for r in (col + 1)..<max(n, col + 1) {
                        let f = pm[r * n + col] * inv
                        guard f != 0 else { continue }
                        for k in col..<n { pm[r * n + k] -= f * pm[col * n + k] }
                        for k in 0..<out { px[r * out + k] -= f * px[col * out + k] }
                    }
                }
                for col in stride(from: n - 1, through: 0, by: -1) {
                    let inv = 1 / pm[col * n + col]
                    for k in 0..<out { px[col * out + k] *= inv }
                    for r in 0..<col {
                        let f = pm[r * n + col]
                        guard f != 0 else { continue }
                        for k in 0..<out { px[r * out + k] -= f * px[col * out + k] }
                    }
                }
            }
        }
        if let col = singular { throw GraftError.invalid("FRoD basis is singular (column \(col))") }
        var u = [Float](repeating: 0, count: out * n), norms = [Float](repeating: 0, count: n)
        for j in 0..<n {
            var s = 0.0
            for o in 0..<out { s += x[j * out + o] * x[j * out + o] }
            let norm = s.squareRoot()
            norms[j] = Float(norm)
            if norm > 1e-12 { for o in 0..<out { u[o * n + j] = Float(x[j * out + o] / norm) } }
        }
        return (u, norms)
    }

    /// U for the current basis (recomputed after the basis was loaded from a file).
    func currentU() -> Tensor {
        let v = basis.scalars
        if let u = cachedU, v == cachedBasis { return u }
        let u = (try? FroDLayer.decompose(weight: baseWeight, basis: v, out: outFeatures, in: inFeatures).u)
            ?? [Float](repeating: .nan, count: outFeatures * inFeatures)
        let t = Tensor(shape: [outFeatures, inFeatures], values: u)
        cachedU = t
        cachedBasis = v
        return t
    }

    /// S's row and column positions, or nil when the (file-supplied) positions are not integers in `0..<in`.
    func positions() -> (rows: [Int], cols: [Int])? {
        let nnz = values.count, n = inFeatures
        let raw = indices.scalars
        guard raw.count == 2 * nnz, raw.allSatisfy({ $0.isFinite && $0 >= 0 && $0 < Float(n) && $0.rounded() == $0 }) else { return nil }
        let idx = raw.map { Int($0) }
        return (Array(idx[0..<nnz]), Array(idx[nnz..<(2 * nnz)]))
    }

    /// `z Sᵀ` for `z: [rows, in]`, S sparse at `indices` with `values`, recorded for autograd. Positions outside the
    /// layer (a corrupt file) make the product NaN, which the loss reports, rather than writing out of bounds.
    func sparseProduct(_ z: Tensor) -> Tensor {
        let rows = z.shape[0], n = inFeatures, nnz = values.count
        guard let (r, c) = positions() else { return z * Float.nan }
        let values = values
        let out = Tensor(zeros: [rows, n])
        let pz = z.pointer, pv = values.pointer, po = out.pointer
        parallelFor(rows, grain: 16) { range in
            for t in range { for k in 0..<nnz { po[t * n + r[k]] += pv[k] * pz[t * n + c[k]] } }
        }
        return Tensor.recordingCustomOp(out, inputs: [z, values]) { g in
            let pg = g.pointer, pz = z.pointer, pv = values.pointer
            let dz = Tensor(zeros: z.shape), dv = Tensor(zeros: values.shape)
            for t in 0..<rows {
                for k in 0..<nnz {
                    dz.pointer[t * n + c[k]] += pv[k] * pg[t * n + r[k]]
                    dv.pointer[k] += pg[t * n + r[k]] * pz[t * n + c[k]]
                }
            }
            return [z.requiresGrad ? dz : nil, values.requiresGrad ? dv : nil]
        }
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let xd = dropout(x, p: dropoutProbability, state: state).reshaped([-1, inFeatures])
        let z = matmul(xd, basis)
        let added = linear(sparseProduct(z) + z * lambda, currentU())
        if dropoutProbability > 0, state.isTraining {
            // PEFT keeps the base output and swaps in the adapter's product of the dropped-out input.
            return y + (added - linear(xd, layer.weight)).reshaped(y.shape)
        }
        return (layer.bias.map { added + $0 } ?? added).reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let n = inFeatures, nnz = values.count
            let core = Tensor(zeros: [n, n])
            for j in 0..<n { core.pointer[j * n + j] = lambda.pointer[j] }
            guard let (r, c) = positions() else { return Tensor(repeating: .nan, shape: [outFeatures, n]) }
            for k in 0..<nnz { core.pointer[r[k] * n + c[k]] += values.pointer[k] }
            return matmul(matmul(currentU(), core), basis, transposeB: true) - base.weight
        }
    }
}

/// FRoD (`peft_type: "FROD"`): `sparse_rate`, `projection_prng_key`, `save_projection`, `frod_dropout`,
/// `init_weights`; `regularization_alpha` only shapes PEFT's basis for tall stacks (see ``sharedTensors(forTargets:config:state:)``);
/// `runtime_offload_base_weight` and `progressbar` do not change results.
public enum FroDFactory: AdapterMethodFactory {
    public static let peftType = "FROD"
    public static let family = "reparametrized (shared basis, diagonal + sparse core)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["sparse_rate": 0.01, "target_modules": targets] }
    public static func sharedTensorIsInteger(_ key: String) -> Bool {
        key.hasPrefix("base_model.frod_s_indices.") || key.hasPrefix("base_model.frod_s_size.")
    }

    public static func validate(_ config: AdapterConfig) throws {
        let rate = try config.double("sparse_rate", default: 0.01)
        guard rate >= 0, rate <= 1 else { throw GraftError.invalid("\(config.source): 'sparse_rate' must be in [0, 1], got \(rate)") }
        guard try config.int("projection_prng_key", default: 0) >= 0 else {
            throw GraftError.invalid("\(config.source): 'projection_prng_key' must be non-negative")
        }
        try validateDropoutBiasAndLayout(config, dropoutKey: "frod_dropout")
        // Placement and progress display only; the file's projections are read when saved with save_projection.
        config.acknowledge("runtime_offload_base_weight", "progressbar", "save_projection", "regularization_alpha")
    }

    /// PEFT's role of a module path: the last two components (`self_query`), the last after a layer index, and
    /// `attention_output` for BERT's attention output dense.
    static func category(_ path: String) -> String {
        let parts = path.split(separator: ".").map(String.init)
        guard parts.count > 1 else { return path }
        if Int(parts[parts.count - 2]) != nil { return parts[parts.count - 1] }
        let c = "\(parts[parts.count - 2])_\(parts[parts.count - 1])"
        return c == "output_dense" && parts.count >= 3 && parts[parts.count - 3] == "attention" ? "attention_output" : c
    }

    /// Per role: the basis V (right singular vectors of the role's stacked weights, via their Gram matrix so the
    /// basis is complete; PEFT's own rule for stacks taller than wide is a QR/eigh construction Graft does not
    /// reproduce, so a fresh Graft basis differs from PEFT's while files are read exactly), and S's positions:
    /// `randperm` of the off-diagonal entries from one PyTorch generator, roles in sorted order.
    public static func sharedTensors(forTargets targets: [(path: String, layer: Linear)], config: AdapterConfig,
                                     state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let rate = try config.double("sparse_rate", default: 0.01)
        var generator = TorchGenerator(seed: UInt64(try config.int("projection_prng_key", default: 0)))
        var byRole: [String: [Linear]] = [:]
        for (path, layer) in targets { byRole[category(path), default: []].append(layer) }
        var out: [(key: String, tensor: Tensor)] = []
        for role in byRole.keys.sorted() {
            let layers = byRole[role] ?? []
            guard let n = layers.first?.inFeatures, layers.allSatisfy({ $0.inFeatures == n }) else {
                throw GraftError.invalid("\(config.source): FRoD role '\(role)' mixes input widths")
            }
            let gram = Tensor(zeros: [n, n])
            for l in layers { gram.addInPlace(withNoGrad { matmul(l.weight, l.weight, transposeA: true) }) }
            let (u, _, _) = try svd(gram, what: "\(config.source): FRoD basis for '\(role)'")
            let offDiagonal = n * n - n
            var nnz = min(Int(Double(n * n) * rate), offDiagonal)
            if rate > 0, offDiagonal > 0 { nnz = max(1, nnz) }
            let perm = nnz > 0 ? generator.randperm(offDiagonal) : []
            var rows: [Float] = [], cols: [Float] = []
            for p in perm.prefix(nnz) {
                // The p-th off-diagonal entry in row-major order.
                let r = p / (n - 1), c0 = p % (n - 1)
                rows.append(Float(r))
                cols.append(Float(c0 >= r ? c0 + 1 : c0))
            }
            out.append(("base_model.frod_V.\(role)", u))
            out.append(("base_model.frod_s_indices.\(role)", Tensor(shape: [2, nnz], values: rows + cols)))
            out.append(("base_model.frod_s_size.\(role)", Tensor(shape: [2], values: [Float(n), Float(n)])))
        }
        return out
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let role = category(path)
        guard let v = shared["base_model.frod_V.\(role)"], let idx = shared["base_model.frod_s_indices.\(role)"] else {
            throw GraftError(.internalError, "FRoD: the basis for '\(role)' was not created")
        }
        do {
            return try FroDLayer(base: layer, basis: v, indices: idx, initWeights: try config.bool("init_weights", default: true),
                                 dropout: Float(try config.double("frod_dropout", default: 0)), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
