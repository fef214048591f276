import GraftTensor

/// Bit-exact conversions between Float32 and the 16-bit float formats stored in model files.
///
/// Narrowing rounds to nearest, ties to even; infinities stay infinite, NaNs stay NaN (quiet), and
/// IEEE half subnormals are produced and decoded exactly.
public enum HalfFloat {
    /// Decodes an IEEE 754 binary16 bit pattern.
    @inlinable public static func float(fromF16 h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exp = UInt32(h >> 10) & 0x1f
        let mant = UInt32(h & 0x3ff)
        if exp == 0x1f {
            return Float(bitPattern: sign | 0x7f80_0000 | (mant << 13))
        }
        if exp == 0 {
            // Zero or subnormal: mant * 2^-24, exact in Float32.
            let magnitude = Float(mant) * 0x1p-24
            return Float(bitPattern: sign | magnitude.bitPattern)
        }
        return Float(bitPattern: sign | ((exp + 112) << 23) | (mant << 13))
    }

    /// Encodes a Float32 as IEEE 754 binary16, rounding to nearest even.
    @inlinable public static func f16(from value: Float) -> UInt16 {
        let x = value.bitPattern
        let sign = UInt16(truncatingIfNeeded: (x >> 16) & 0x8000)
        let a = x & 0x7fff_ffff
        if a >= 0x7f80_0000 {
            // Inf stays inf; NaN keeps its top payload bits and is made quiet.
            return sign | 0x7c00 | (a > 0x7f80_0000 ? UInt16(0x200) | UInt16(truncatingIfNeeded: (a >> 13) & 0x3ff) : 0)
        }
        if a >= 0x477f_f000 {  // >= 65520 rounds to infinity
            return sign | 0x7c00
        }
        if a < 0x3880_0000 {  // below 2^-14: subnormal half (or zero)
            // Adding 0.5 aligns the ulp to 2^-24, so the FPU performs the round-to-nearest-even.
            let f = Float(bitPattern: a) + 0.5
            return sign | UInt16(truncatingIfNeeded: f.bitPattern &- 0x3f00_0000)
        }
        let odd = (a >> 13) & 1
        // Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
        let r = a &+ 0xc800_0fff &+ odd
        return sign | UInt16(truncatingIfNeeded: r >> 13)
    }

    /// Decodes a bfloat16 bit pattern (the top half of a Float32).
    @inlinable public static func float(fromBF16 b: UInt16) -> Float {
        Float(bitPattern: UInt32(b) << 16)
    }

    /// Encodes a Float32 as bfloat16, rounding to nearest even; NaN stays a quiet NaN.
    @inlinable public static func bf16(from value: Float) -> UInt16 {
        let x = value.bitPattern
        if x & 0x7fff_ffff > 0x7f80_0000 {
            return UInt16(truncatingIfNeeded: x >> 16) | 0x0040
        }
        let rounded = x &+ 0x7fff &+ ((x >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }

    /// Decodes `count` little-endian binary16 values from unaligned `src` into `dst`.
    public static func decodeF16(_ src: UnsafeRawPointer, into dst: UnsafeMutablePointer<Float>, count: Int) {
        parallelFor(count, grain: 1 << 16) { r in
            for i in r {
                dst[i] = float(fromF16: UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
            }
        }
    }

    /// Decodes `count` little-endian bfloat16 values from unaligned `src` into `dst`.
    public static func decodeBF16(_ src: UnsafeRawPointer, into dst: UnsafeMutablePointer<Float>, count: Int) {
        parallelFor(count, grain: 1 << 16) { r in
            for i in r {
                dst[i] = float(fromBF16: UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
            }
        }
    }

    /// Encodes `count` floats as little-endian binary16 into unaligned `dst`.
    public static func encodeF16(_ src: UnsafePointer<Float>, into dst: UnsafeMutableRawPointer, count: Int) {
        parallelFor(count, grain: 1 << 16) { r in
            for i in r {
                dst.storeBytes(of: f16(from: src[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self)
            }
        }
    }

    /// Encodes `count` floats as little-endian bfloat16 into unaligned `dst`.
    public static func encodeBF16(_ src: UnsafePointer<Float>, into dst: UnsafeMutableRawPointer, count: Int) {
        parallelFor(count, grain: 1 << 16) { r in
            for i in r {
                dst.storeBytes(of: bf16(from: src[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self)
            }
        }
    }
}
