import GraftTensor

/// Little-endian f16 store (unaligned).
@inline(__always) private func storeHalf(_ v: Float, _ p: UnsafeMutablePointer<UInt8>, _ o: Int) {
    let h = HalfFloat.f16(from: v)
    p[o] = UInt8(truncatingIfNeeded: h)
    p[o + 1] = UInt8(truncatingIfNeeded: h >> 8)
}

/// `v` limited to [lo, hi]; 0 for NaN (a scale of 1/d with a subnormal d can make ±inf or NaN).
@inline(__always) private func clamped(_ v: Float, _ lo: Float, _ hi: Float) -> Float {
    v.isNaN ? 0 : min(max(v, lo), hi)
}

extension GGMLType {
    /// Whether ``quantize(_:into:count:)`` can write this format.
    public var canQuantize: Bool { [.f32, .f16, .bf16, .q8_0, .q4_1].contains(self) }

    /// Stores `count` Float32 values from `src` in this format at `dst` (`count / blockSize * typeSize` bytes), as
    /// ggml's `quantize_row_*_ref` routines do: Q8_0 `d = max|x|/127`, `q = round(x/d)`; Q4_1 `d = (max − min)/15`,
    /// `m = min`, `q = min(15, ⌊(x − m)/d + ½⌋)`, element j in the low nibble of byte j and element j + 16 in its
    /// high nibble. Throws `.unsupported` for other formats, `.invalidArgument` for a count that is not a multiple
    /// of the block size, and for non-finite values.
    public func quantize(_ src: UnsafePointer<Float>, into dst: UnsafeMutableRawPointer, count: Int) throws {
        guard count >= 0, count % blockSize == 0 else {
            throw GraftError.invalid("\(name): element count \(count) is not a multiple of the block size \(blockSize)")
        }
        guard canQuantize else { throw GraftError(.unsupported, "writing \(name) tensors is not supported (F32, F16, BF16, Q8_0 and Q4_1 are)") }
        for i in 0..<count where !src[i].isFinite {
            throw GraftError.invalid("element \(i) is \(src[i]); a \(name) tensor is written from finite values only")
        }
        let out = dst.assumingMemoryBound(to: UInt8.self)
        switch self {
        case .f32: dst.copyMemory(from: src, byteCount: count * 4)
        case .f16: HalfFloat.encodeF16(src, into: dst, count: count)
        case .bf16:
            for i in 0..<count {
                let b = HalfFloat.bf16(from: src[i])
                out[2 * i] = UInt8(truncatingIfNeeded: b)
                out[2 * i + 1] = UInt8(truncatingIfNeeded: b >> 8)
            }
        case .q8_0:
            for b in 0..<(count / 32) {
                let x = src + b * 32, y = out + b * 34
                var amax: Float = 0
                for j in 0..<32 { amax = max(amax, abs(x[j])) }
                let d = amax / 127, id: Float = d != 0 ? 1 / d : 0
                storeHalf(d, y, 0)
                for j in 0..<32 { y[2 + j] = UInt8(bitPattern: Int8(clamped((x[j] * id).rounded(.toNearestOrAwayFromZero), -127, 127))) }
            }
        case .q4_1:
            for b in 0..<(count / 32) {
                let x = src + b * 32, y = out + b * 20
                var lo = Float.greatestFiniteMagnitude, hi = -Float.greatestFiniteMagnitude
                for j in 0..<32 { lo = min(lo, x[j]); hi = max(hi, x[j]) }
                let d = (hi - lo) / 15, id: Float = d != 0 ? 1 / d : 0
                storeHalf(d, y, 0)
                storeHalf(lo, y, 2)
                for j in 0..<16 {
                    let q0 = UInt8(clamped(((x[j] - lo) * id + 0.5).rounded(.down), 0, 15))
                    let q1 = UInt8(clamped(((x[j + 16] - lo) * id + 0.5).rounded(.down), 0, 15))
                    y[4 + j] = q0 | q1 << 4
                }
            }
        default: break
        }
    }
}
