import Foundation
import GraftTensor

/// PyTorch's CPU generator (`torch.Generator().manual_seed(seed)`) for the float32 draws PEFT makes from a seed:
/// `uniform_` (and so `kaiming_uniform_`) and `normal` / `randn`, so projections PEFT does not save are regenerated
/// as PEFT drew them. The engine is MT19937 (``TorchRandperm/MT19937``).
///
/// - `uniform_(from, to)` on float32 draws one 32-bit word per element in order and returns
///   `(w & (2²⁴ − 1)) · 2⁻²⁴ · (to − from) + from`, the product and sum in double, rounded to float32.
/// - `normal_` on a contiguous float32 tensor of 16 or more elements fills it with uniforms, then Box–Muller on
///   each block of 16 (`u₁ = 1 − d[j]`, `u₂ = d[j + 8]`, `d[j] = √(−2 ln u₁) cos 2πu₂`, `d[j + 8] = … sin …`);
///   when the size is not a multiple of 16 the last 16 are redrawn and transformed again. Smaller tensors draw
///   each value from a 53-bit double pair (`normal_distribution<double>`). PyTorch's AVX2 kernel evaluates
///   log/sin/cos in float32 polynomials, so values agree to a few float32 ulps, not bit for bit.
struct TorchGenerator {
    private var mt: TorchRandperm.MT19937

    /// The generator after `manual_seed(seed)`.
    init(seed: UInt64) {
        mt = TorchRandperm.MT19937(seed: UInt32(truncatingIfNeeded: seed))
    }

    /// One float32 uniform in [0, 1) as `uniform_real_distribution<float>` draws it.
    private mutating func unit() -> Float {
        Float(mt.next() & 0xFF_FFFF) * Float(1.0 / 16_777_216.0)
    }

    /// One double uniform in [0, 1): 53 bits of `(w₁ << 32) | w₂`.
    private mutating func unitDouble() -> Double {
        let hi = UInt64(mt.next()), lo = UInt64(mt.next())
        return Double(((hi << 32) | lo) & ((1 << 53) - 1)) / 9_007_199_254_740_992.0
    }

    /// `tensor.uniform_(from, to, generator=g)` for `count` float32 values.
    mutating func uniform(_ count: Int, from: Double, to: Double) -> [Float] {
        let lo = Float(from), hi = Float(to)
        // Evaluated in double and rounded once, as PyTorch's kernel does (float32 steps differ by an ulp).
        let range = Double(hi - lo)
        return (0..<count).map { _ in Float(Double(unit()) * range + Double(lo)) }
    }

    /// `nn.init.kaiming_uniform_(t, a=a, generator=g)` on a `[rows, cols]` matrix (fan_in = cols, leaky-ReLU gain).
    mutating func kaimingUniform(rows: Int, cols: Int, a: Double) -> Tensor {
        let gain = (2.0 / (1 + a * a)).squareRoot()
        let bound = 3.0.squareRoot() * gain / Double(max(cols, 1)).squareRoot()
        return Tensor(shape: [rows, cols], values: uniform(rows * cols, from: -bound, to: bound))
    }

    /// `torch.randperm(n, generator=g)` for `n` below 2³² / 20: a forward Fisher–Yates shuffle, `n − 1` draws.
    mutating func randperm(_ n: Int) -> [Int] {
        var perm = Array(0..<n)
        guard n > 1 else { return perm }
        for i in 0..<(n - 1) { perm.swapAt(i, i + Int(mt.next() % UInt32(n - i))) }
        return perm
    }

    /// `torch.normal(mean, std, size, generator=g)` / `randn` for `count` float32 values.
    mutating func normal(_ count: Int, mean: Double = 0, std: Double = 1) -> [Float] {
        guard count >= 16 else {
            // normal_distribution<double>: Box–Muller on two 53-bit uniforms; the sine half is kept for the next call.
            var cached: Double? = nil
            return (0..<count).map { _ in
                if let c = cached {
                    cached = nil
                    return Float(c * std + mean)
                }
                let u1 = unitDouble(), u2 = unitDouble()
                let r = (-2 * Foundation.log1p(-u2)).squareRoot()
                let theta = 2 * Double.pi * u1
                cached = r * Foundation.sin(theta)
                return Float(r * Foundation.cos(theta) * std + mean)
            }
        }
        var data = (0..<count).map { _ in unit() }
        func fill16(_ base: Int) {
            for j in 0..<8 {
                let u1 = 1 - data[base + j], u2 = data[base + j + 8]
                let radius = (-2 * Foundation.log(Double(u1))).squareRoot()
                let theta = 2 * Double.pi * Double(u2)
                data[base + j] = Float(radius * Foundation.cos(theta) * std + mean)
                data[base + j + 8] = Float(radius * Foundation.sin(theta) * std + mean)
            }
        }
        var i = 0
        while i + 16 <= count {
            fill16(i)
            i += 16
        }
        if count % 16 != 0 {
            for j in (count - 16)..<count { data[j] = unit() }
            fill16(count - 16)
        }
        return data
    }
}
