#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Which coordinates rotary position embedding rotates together.
public enum RoPEStyle: Sendable {
    /// `(i, i + d/2)`: Hugging Face's `rotate_half` layout (Llama as transformers stores it).
    case halfSplit
    /// `(2i, 2i + 1)`: the original paper's and GGUF's (permuted) layout.
    case adjacentPairs
}

/// Rotary position embedding applied to `x` of shape `[tokens, heads, headDim]` (or `[..., tokens, heads,
/// headDim]` flattened over the leading dimensions), with one position per token.
///
/// The angle of pair `i` at position `p` is `p · base^(−2i/headDim)`.
public func rope(_ x: Tensor, positions: [Int32], headDim: Int, base: Float, style: RoPEStyle = .halfSplit) -> Tensor {
    precondition(x.lastDim == headDim && headDim % 2 == 0, "rope: \(x.shape) vs head dim \(headDim)")
    let tokens = positions.count
    precondition(x.count % (tokens * headDim) == 0, "rope: \(x.shape) vs \(tokens) positions")
    let heads = x.count / (tokens * headDim)
    let half = headDim / 2
    // Angles are computed the way transformers does: inv_freq in Float32, position × inv_freq in Float32.
    var invFreq = [Float](repeating: 0, count: half)
    for i in 0..<half { invFreq[i] = 1 / powf(base, Float(2 * i) / Float(headDim)) }
    let cosT = Tensor(zeros: [tokens, half]), sinT = Tensor(zeros: [tokens, half])
    for t in 0..<tokens {
        let p = Float(positions[t])
        for i in 0..<half {
            let a = p * invFreq[i]
            cosT.pointer[t * half + i] = cosf(a)
            sinT.pointer[t * half + i] = sinf(a)
        }
    }
    let out = Tensor(zeros: x.shape)
    applyRotation(x.pointer, out.pointer, cosT.pointer, sinT.pointer, tokens: tokens, heads: heads,
                  headDim: headDim, style: style, sign: 1)
    let xShape = x.shape
    return Tensor.result(out, inputs: [x]) { g in
        let d = Tensor(zeros: xShape)
        applyRotation(g.pointer, d.pointer, cosT.pointer, sinT.pointer, tokens: tokens, heads: heads,
                      headDim: headDim, style: style, sign: -1)
        return [d]
    }
}

private func applyRotation(
    _ src: UnsafeMutablePointer<Float>, _ dst: UnsafeMutablePointer<Float>,
    _ cosP: UnsafeMutablePointer<Float>, _ sinP: UnsafeMutablePointer<Float>,
    tokens: Int, heads: Int, headDim: Int, style: RoPEStyle, sign: Float
) {
    let half = headDim / 2
    let perToken = heads * headDim
    let leading = tokens == 0 ? 0 : heads / max(1, heads)  // heads already counts every leading dimension
    _ = leading
    for t in 0..<tokens {
        let c = cosP + t * half, s = sinP + t * half
        for h in 0..<heads {
            // Leading dimensions flattened into `heads` keep token-major order only for [tokens, heads, d].
            let base = t * perToken + h * headDim
            let xs = src + base, ys = dst + base
            switch style {
            case .halfSplit:
                for i in 0..<half {
                    let a = xs[i], b = xs[i + half]
                    let sn = sign * s[i]
                    ys[i] = a * c[i] - b * sn
                    ys[i + half] = b * c[i] + a * sn
                }
            case .adjacentPairs:
                for i in 0..<half {
                    let a = xs[2 * i], b = xs[2 * i + 1]
                    let sn = sign * s[i]
                    ys[2 * i] = a * c[i] - b * sn
                    ys[2 * i + 1] = b * c[i] + a * sn
                }
            }
        }
    }
}
