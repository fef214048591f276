import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// OSF (orthogonal subspace fine-tuning): the weight's SVD split at `effective_rank` `k`, the top-`k` part
/// `U_h S_h V_h` frozen and the rest `U_l S_l V_l` trained, with the gradients of `U_l` and `V_l` projected off the
/// frozen subspaces (`g − U_h U_hᵀ g`, `g − g V_hᵀ V_h`, PEFT's gradient hooks) so training stays orthogonal to it.
/// The layer computes `x W'ᵀ + b` with `W' = U_h S_h V_h + U_l S_l V_l` formed densely (the trainable rank is
/// nearly full, so this is the cheap form, and it adds in PEFT's order). The frozen part is
/// recomputed from the base weight's SVD (the product `U_h S_h V_h` does not depend on singular-vector signs); PEFT
/// saves only the trainable part, keys `osf_svd_params.U_low` `[out, m − k]`, `osf_svd_params.S_low`,
/// `osf_svd_params.V_low` `[m − k, in]` (`m = min(out, in)`).
public final class OSFLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The trainable low part.
    public let uLow: Tensor, sLow: Tensor, vLow: Tensor
    let uHigh: Tensor, sHigh: Tensor, vHigh: Tensor
    /// `U_h S_h V_h` `[out, in]` (nil when `effective_rank` is 0).
    let highPart: Tensor?

    init(base: Linear, effectiveRank: Int, state: AdapterState, path: String) throws {
        self.state = state
        // The SVD runs in Float64 and the frozen part `U_h S_h V_h` is summed there, rounding once: PEFT's layer
        // computes `W + U_l S_l V_l − U_l0 S_l0 V_l0` with its own float32 SVD, whose exact value is that part, and
        // a float32 split here differed from PEFT's by 1.2e-4 on the shared MiniLM fixture, this one by 7.4e-5.
        // LAPACK factors Wᵀ (the row-major [in, out] buffer): Wᵀ = u s vt, so W = vtᵀ s uᵀ.
        let weight = base.weight
        let outFeatures = weight.shape[0], inFeatures = weight.shape[1]
        let f = try svdFloat64(weight.transposed(0, 1), what: path)
        let m = f.s.count, k = min(max(effectiveRank, 0), m)
        // left[i, r] = vt[r, i] ([out, m]); right[r, j] = u[j, r] ([m, in]).
        let left = Tensor(shape: [outFeatures, m], values: (0..<(outFeatures * m)).map { Float(f.vt[($0 % m) * outFeatures + $0 / m]) })
        let right = Tensor(shape: [m, inFeatures], values: (0..<(m * inFeatures)).map { Float(f.u[($0 % inFeatures) * m + $0 / inFeatures]) })
        uHigh = left.slice(dim: 1, 0..<k)
        sHigh = Tensor(shape: [k], values: f.s.prefix(k).map(Float.init))
        vHigh = right.slice(dim: 0, 0..<k)
        uLow = left.slice(dim: 1, k..<m).requiringGrad()
        sLow = Tensor(shape: [m - k], values: f.s.dropFirst(k).map(Float.init)).requiringGrad()
        vLow = right.slice(dim: 0, k..<m).requiringGrad()
        // U_h S_h V_h = (s ⊙ vt[:k])ᵀ · u[:, :k]ᵀ.
        let scaledRows = (0..<(k * outFeatures)).map { f.s[$0 / outFeatures] * f.vt[$0] }
        highPart = k > 0 ? transposedProductFloat64(scaledRows, f.u, m: outFeatures, n: inFeatures, k: k, ldb: m) : nil
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("osf_svd_params.U_low", uLow), ("osf_svd_params.S_low", sLow), ("osf_svd_params.V_low", vLow)]
    }

    /// `t` itself, with its gradient projected off the frozen subspace: `g − B Bᵀ g` (`left`, B = U_h) or
    /// `g − g Bᵀ B` (B = V_h).
    func projected(_ t: Tensor, basis: Tensor, left: Bool) -> Tensor {
        let view = Tensor(shape: t.shape, storage: t.storage)
        return Tensor.recordingCustomOp(view, inputs: [t]) { g in
            guard basis.count > 0 else { return [g] }
            return [withNoGrad {
                left ? g - matmul(basis, matmul(basis, g, transposeA: true)) : g - matmul(matmul(g, basis, transposeB: true), basis)
            }]
        }
    }

    /// `W' = U_h S_h V_h + U_l S_l V_l`, recorded for autograd through the low part. The trainable rank is close to
    /// full, so one dense `[out, in]` weight and one GEMM with the input cost less than the two factored products
    /// (and add in PEFT's order).
    func reconstructed() -> Tensor {
        let low = matmul(projected(uLow, basis: uHigh, left: true) * sLow.reshaped([1, sLow.count]),
                         projected(vLow, basis: vHigh, left: false))
        return highPart.map { $0 + low } ?? low
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        linear(x, reconstructed(), layer.bias)
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { reconstructed() - base.weight } }
}

/// OSF (`peft_type: "OSF"`): `effective_rank` (an integer, or a fraction in (0, 1) of the smaller dimension;
/// default half of it) and `rank_pattern` (regex searched in the module path, first match). `init_weights` and
/// `target_svd_config` are accepted and ignored, as PEFT does.
public enum OSFFactory: AdapterMethodFactory {
    public static let peftType = "OSF"
    public static let family = "reparametrized (trainable minor SVD subspace)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["effective_rank": 0.75, "target_modules": targets] }

    /// PEFT's `_resolve_rank`: nil → half the smaller dimension; a fraction → that share of it; clamped to it.
    static func resolve(_ value: Any?, minDim: Int, config: AdapterConfig, key: String) throws -> Int {
        guard let value, !(value is NSNull) else { return minDim / 2 }
        guard let d = JSONScalar.number(value), d.isFinite, d >= 0 else {
            throw GraftError.invalid("\(config.source): '\(key)' must be a non-negative number, got \(JSONScalar.describe(value))")
        }
        return d > 0 && d < 1 ? Int(Double(minDim) * d) : Int(min(d, Double(minDim)))
    }

    public static func validate(_ config: AdapterConfig) throws {
        _ = try resolve(config.value("effective_rank"), minDim: 1, config: config, key: "effective_rank")
        for (pattern, _) in try config.patternMap("rank_pattern") {
            guard (try? NSRegularExpression(pattern: pattern)) != nil else {
                throw GraftError.invalid("\(config.source): 'rank_pattern' key '\(pattern)' is not a valid regular expression")
            }
        }
        config.acknowledge("target_svd_config", "init_weights")  // PEFT accepts and ignores both.
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let minDim = min(layer.inFeatures, layer.outFeatures)
        var rank = try resolve(config.value("effective_rank"), minDim: minDim, config: config, key: "effective_rank")
        for (pattern, value) in try config.patternMap("rank_pattern") {
            guard let re = try? NSRegularExpression(pattern: pattern) else { continue }
            if re.firstMatch(in: path, range: NSRange(path.startIndex..., in: path)) != nil {
                rank = try resolve(value, minDim: minDim, config: config, key: "rank_pattern")
                break
            }
        }
        return try OSFLayer(base: layer, effectiveRank: rank, state: state, path: "\(config.source): \(path)")
    }
}
