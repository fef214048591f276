import GraftTensor

/// Little-endian field reads from a block of bytes (unaligned, endian-independent).
@inline(__always) private func half(_ p: UnsafePointer<UInt8>, _ o: Int) -> Float {
    HalfFloat.float(fromF16: UInt16(p[o]) | UInt16(p[o + 1]) << 8)
}

extension GGMLType {
    /// Converts `count` elements stored in this format at `src` to Float32 at `dst`.
    ///
    /// `count` must be a multiple of ``blockSize`` and `src` must hold `count / blockSize * typeSize`
    /// bytes (callers such as ``GGUFFile`` validate this against the file). Large inputs are converted in
    /// parallel chunks of blocks unless `parallel` is false (for callers already running on a worker).
    /// Semantics follow ggml's `dequantize_row_*` reference routines.
    /// Throws `.unsupported` for formats without a converter and `.invalidArgument` for a bad `count`.
    public func dequantize(_ src: UnsafeRawPointer, into dst: UnsafeMutablePointer<Float>, count: Int,
                           parallel: Bool = true) throws {
        guard count >= 0, count % blockSize == 0 else {
            throw GraftError.invalid("\(name): element count \(count) is not a multiple of the block size \(blockSize)")
        }
        guard canDequantize else {
            throw GraftError(.unsupported, "dequantizing \(name) tensors is not supported")
        }
        let blocks = count / blockSize
        let bytes = src.assumingMemoryBound(to: UInt8.self)
        let stride = typeSize
        let kind = self
        // Aim for chunks of about 64K elements so small tensors stay on one thread.
        let grain = parallel ? max(1, 65_536 / blockSize) : max(blocks, 1)
        parallelFor(blocks, grain: grain) { range in
            let p = bytes + range.lowerBound * stride
            let y = dst + range.lowerBound * kind.blockSize
            let n = range.count
            switch kind {
            case .f32:
                #if _endian(little)
                UnsafeMutableRawPointer(y).copyMemory(from: p, byteCount: 4 * n)
                #else
                for i in 0..<n { y[i] = Float(bitPattern: UInt32(littleEndian: UnsafeRawPointer(p).loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
                #endif
            case .f16: HalfFloat.decodeF16Serial(p, y, 0..<n)
            case .bf16: HalfFloat.decodeBF16Serial(p, y, 0..<n)
            case .f64:
                for i in 0..<n { y[i] = Float(Double(bitPattern: UInt64(littleEndian: UnsafeRawPointer(p).loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)))) }
            case .i8:
                for i in 0..<n { y[i] = Float(Int8(bitPattern: p[i])) }
            case .i16:
                for i in 0..<n { y[i] = Float(Int16(littleEndian: UnsafeRawPointer(p).loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))) }
            case .i32:
                for i in 0..<n { y[i] = Float(Int32(littleEndian: UnsafeRawPointer(p).loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))) }
            case .i64:
                for i in 0..<n { y[i] = Float(Int64(littleEndian: UnsafeRawPointer(p).loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))) }
            case .q8_0: Self.q8_0(p, y, n)
            case .q4_0: Self.q4_0(p, y, n)
            case .q4_1: Self.q4_1(p, y, n)
            case .q5_0: Self.q5_0(p, y, n)
            case .q5_1: Self.q5_1(p, y, n)
            case .q4_K: Self.q4_K(p, y, n)
            case .q5_K: Self.q5_K(p, y, n)
            case .q6_K: Self.q6_K(p, y, n)
            default: break  // excluded by canDequantize
            }
        }
    }

    /// Q8_0: `d: f16, qs: [Int8; 32]`, value `qs[j] * d`.
    private static func q8_0(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 34
            let d = half(x, 0)
            let out = y + b * 32
            for j in 0..<32 { out[j] = Float(Int8(bitPattern: x[2 + j])) * d }
        }
    }

    /// Q4_0: `d: f16, qs: [UInt8; 16]`; element j < 16 is the low nibble of byte j, element j + 16 the high
    /// nibble; value `(q - 8) * d`.
    private static func q4_0(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 18
            let d = half(x, 0)
            let out = y + b * 32
            for j in 0..<16 {
                let q = x[2 + j]
                out[j] = Float(Int(q & 0x0f) - 8) * d
                out[j + 16] = Float(Int(q >> 4) - 8) * d
            }
        }
    }

    /// Q4_1: `d: f16, m: f16, qs: [UInt8; 16]`, nibbles as in Q4_0; value `q * d + m`.
    private static func q4_1(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 20
            let d = half(x, 0)
            let m = half(x, 2)
            let out = y + b * 32
            for j in 0..<16 {
                let q = x[4 + j]
                out[j] = Float(q & 0x0f) * d + m
                out[j + 16] = Float(q >> 4) * d + m
            }
        }
    }

    /// The 32 fifth bits of a Q5 block, little-endian.
    @inline(__always) private static func highBits(_ x: UnsafePointer<UInt8>, _ o: Int) -> UInt32 {
        UInt32(x[o]) | UInt32(x[o + 1]) << 8 | UInt32(x[o + 2]) << 16 | UInt32(x[o + 3]) << 24
    }

    /// Q5_0: `d: f16, qh: UInt32, qs: [UInt8; 16]`; bit j of `qh` is the fifth bit of element j; value `(q - 16) * d`.
    private static func q5_0(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 22
            let d = half(x, 0)
            let qh = highBits(x, 2)
            let out = y + b * 32
            for j in 0..<16 {
                let q = x[6 + j]
                let lo = Int(q & 0x0f) | Int((qh >> UInt32(j)) & 1) << 4
                let hi = Int(q >> 4) | Int((qh >> UInt32(j + 16)) & 1) << 4
                out[j] = Float(lo - 16) * d
                out[j + 16] = Float(hi - 16) * d
            }
        }
    }

    /// Q5_1: `d: f16, m: f16, qh: UInt32, qs: [UInt8; 16]`; value `q * d + m`.
    private static func q5_1(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 24
            let d = half(x, 0)
            let m = half(x, 2)
            let qh = highBits(x, 4)
            let out = y + b * 32
            for j in 0..<16 {
                let q = x[8 + j]
                let lo = UInt32(q & 0x0f) | ((qh >> UInt32(j)) & 1) << 4
                let hi = UInt32(q >> 4) | ((qh >> UInt32(j + 16)) & 1) << 4
                out[j] = Float(lo) * d + m
                out[j + 16] = Float(hi) * d + m
            }
        }
    }

    /// The 6-bit scale and min of sub-block `j` (0..<8) from the 12 packed bytes at `s` (K-quants).
    @inline(__always) private static func scaleMin(_ j: Int, _ s: UnsafePointer<UInt8>) -> (Float, Float) {
        if j < 4 {
            return (Float(s[j] & 63), Float(s[j + 4] & 63))
        }
        let sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4)
        let mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4)
        return (Float(sc), Float(mn))
    }

    /// Q4_K: `d: f16, dmin: f16, scales: [UInt8; 12], qs: [UInt8; 128]`. Each 64 values use 32 bytes: the low
    /// nibbles give sub-block 2k, the high nibbles sub-block 2k+1; value `d * sc * q - dmin * m`.
    private static func q4_K(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 144
            let d = half(x, 0)
            let dmin = half(x, 2)
            let scales = x + 4
            var q = x + 16
            var out = y + b * 256
            for pair in 0..<4 {
                let (s1, m1) = scaleMin(2 * pair, scales)
                let (s2, m2) = scaleMin(2 * pair + 1, scales)
                let d1 = d * s1, min1 = dmin * m1
                let d2 = d * s2, min2 = dmin * m2
                for l in 0..<32 { out[l] = d1 * Float(q[l] & 0x0f) - min1 }
                for l in 0..<32 { out[32 + l] = d2 * Float(q[l] >> 4) - min2 }
                q += 32
                out += 64
            }
        }
    }

    /// Q5_K: `d, dmin: f16, scales: [UInt8; 12], qh: [UInt8; 32], qs: [UInt8; 128]`; like Q4_K with a fifth
    /// bit per value taken from `qh` (bit 2k for the low-nibble half, 2k+1 for the high).
    private static func q5_K(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 176
            let d = half(x, 0)
            let dmin = half(x, 2)
            let scales = x + 4
            let qh = x + 16
            var ql = x + 48
            var out = y + b * 256
            var u1: UInt8 = 1, u2: UInt8 = 2
            for pair in 0..<4 {
                let (s1, m1) = scaleMin(2 * pair, scales)
                let (s2, m2) = scaleMin(2 * pair + 1, scales)
                let d1 = d * s1, min1 = dmin * m1
                let d2 = d * s2, min2 = dmin * m2
                for l in 0..<32 { out[l] = d1 * Float((ql[l] & 0x0f) + (qh[l] & u1 != 0 ? 16 : 0)) - min1 }
                for l in 0..<32 { out[32 + l] = d2 * Float((ql[l] >> 4) + (qh[l] & u2 != 0 ? 16 : 0)) - min2 }
                ql += 32
                out += 64
                u1 <<= 2
                u2 <<= 2
            }
        }
    }

    /// Q6_K: `ql: [UInt8; 128], qh: [UInt8; 64], scales: [Int8; 16], d: f16`; value `d * scale * (q - 32)`
    /// with q the 4 low bits from `ql` and 2 high bits from `qh`, 16 values per scale.
    private static func q6_K(_ p: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let x = p + b * 210
            let d = half(x, 208)
            var ql = x
            var qh = x + 128
            var sc = x + 192
            var out = y + b * 256
            for _ in 0..<2 {
                for l in 0..<32 {
                    let s = l / 16
                    let q1 = Int((ql[l] & 0x0f) | ((qh[l] >> 0) & 3) << 4) - 32
                    let q2 = Int((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) - 32
                    let q3 = Int((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32
                    let q4 = Int((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32
                    out[l] = d * Float(Int8(bitPattern: sc[s])) * Float(q1)
                    out[l + 32] = d * Float(Int8(bitPattern: sc[s + 2])) * Float(q2)
                    out[l + 64] = d * Float(Int8(bitPattern: sc[s + 4])) * Float(q3)
                    out[l + 96] = d * Float(Int8(bitPattern: sc[s + 6])) * Float(q4)
                }
                out += 128
                ql += 64
                qh += 32
                sc += 8
            }
        }
    }
}
