import Foundation
import GraftTensor

/// Incremental adapter tuning with semantic shift compensation (Tan et al., 2024, "Semantically-Shifted Incremental
/// Adapter-Tuning is a Continual ViTransformer"): in class-incremental learning one shared adapter is tuned again in
/// every session, without constraints and without storing samples; each class keeps a prototype (its mean feature)
/// and a per-dimension variance, old prototypes are moved by the estimated shift of the feature space, and a unified
/// head is refit from features sampled around the prototypes.
///
/// The shift of an old class `c` is estimated from the current session's samples only: with `fᵢ` a sample's
/// feature before this session's tuning and `f'ᵢ` after it,
/// `Δμ_c = Σᵢ wᵢc (f'ᵢ − fᵢ) / Σᵢ wᵢc`, `wᵢc = exp(−‖fᵢ − μ_c‖² / (2σ²))`, and `μ_c ← μ_c + Δμ_c`
/// (``compensate(prototypes:before:after:sigma:)``): samples close to the old prototype tell how its region moved.
public enum IncrementalAdapterTuning {
    /// The old prototypes moved by the semantic shift the current samples show. `prototypes[c]` has `d` floats;
    /// `before` and `after` are the current samples' features (`[n, d]`) before and after this session's tuning.
    /// A prototype with no weight (all samples infinitely far) is left where it was. Returns the new prototypes
    /// and each one's shift norm `‖Δμ_c‖`.
    public static func compensate(prototypes: [[Float]], before: Tensor, after: Tensor, sigma: Float) throws -> (prototypes: [[Float]], shifts: [Float]) {
        guard sigma.isFinite, sigma > 0 else { throw GraftError.invalid("semantic shift: sigma must be a positive number, got \(sigma)") }
        guard before.shape.count == 2, before.shape == after.shape, before.shape[0] > 0 else {
            throw GraftError.invalid("semantic shift: features before \(before.shape) and after \(after.shape) tuning must both be [n ≥ 1, d]")
        }
        let n = before.shape[0], d = before.shape[1]
        let f = before.pointer, g = after.pointer
        var moved: [[Float]] = [], shifts: [Float] = []
        for (c, mu) in prototypes.enumerated() {
            guard mu.count == d else { throw GraftError.invalid("semantic shift: prototype \(c) has \(mu.count) values, features have \(d)") }
            // Log-weights first, so the largest weight is exp(0) and far samples underflow harmlessly.
            var logW = [Double](repeating: 0, count: n)
            for i in 0..<n {
                var dist = 0.0
                for j in 0..<d { let e = Double(f[i * d + j] - mu[j]); dist += e * e }
                logW[i] = -dist / (2 * Double(sigma) * Double(sigma))
            }
            guard let top = logW.max(), top.isFinite else {
                throw GraftError.invalid("semantic shift: the features or prototype \(c) hold NaN or Inf")
            }
            var total = 0.0
            var delta = [Double](repeating: 0, count: d)
            for i in 0..<n {
                let w = exp(logW[i] - top)
                total += w
                for j in 0..<d { delta[j] += w * Double(g[i * d + j] - f[i * d + j]) }
            }
            var norm = 0.0
            var out = mu
            for j in 0..<d {
                let s = delta[j] / total
                out[j] = mu[j] + Float(s)
                norm += s * s
            }
            guard out.allSatisfy(\.isFinite) else { throw GraftError.invalid("semantic shift: prototype \(c) became non-finite") }
            moved.append(out)
            shifts.append(Float(norm.squareRoot()))
        }
        return (moved, shifts)
    }

    /// The per-dimension variance of `features` (`[n, d]`) about `mean`, plus `floor` (the class's Gaussian for
    /// sampling, as the method's diagonal-covariance storage).
    public static func variance(_ features: Tensor, mean: [Float], floor: Float = 1e-4) -> [Float] {
        let n = features.shape[0], d = mean.count
        var acc = [Double](repeating: 0, count: d)
        let p = features.pointer
        for r in 0..<n { for j in 0..<d { let e = Double(p[r * d + j] - mean[j]); acc[j] += e * e } }
        return acc.map { Float($0 / Double(max(n - 1, 1))) + floor }
    }

    /// `count` features drawn from `N(mean, diag(variance))` with `rng` (Box–Muller), as `[count, d]`: the
    /// pseudo-samples a unified head is refit on.
    public static func sample(mean: [Float], variance: [Float], count: Int, rng: inout GraftRNG) -> Tensor {
        let d = mean.count
        let out = Tensor(zeros: [count, d])
        let p = out.pointer
        for r in 0..<count {
            for j in 0..<d {
                let u1 = max(rng.nextUniform(), 1e-7), u2 = rng.nextUniform()
                let z = (-2 * log(u1)).squareRoot() * cos(2 * Float.pi * u2)
                p[r * d + j] = mean[j] + z * variance[j].squareRoot()
            }
        }
        return out
    }
}
