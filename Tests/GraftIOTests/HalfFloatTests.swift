import Testing
@testable import GraftIO

/// The 16-bit conversions checked exhaustively against Swift's own `Float16` (an independent implementation)
/// and against hand-computed bfloat16 rounding.
@Suite struct HalfFloatTests {
    @Test func f16DecodeMatchesFloat16ForAllPatterns() {
        for bits in 0...UInt16.max {
            let ours = HalfFloat.float(fromF16: bits)
            let swift = Float(Float16(bitPattern: bits))
            if swift.isNaN {
                #expect(ours.isNaN)
            } else if ours.bitPattern != swift.bitPattern {
                Issue.record("f16 \(bits): \(ours) != \(swift)")
                return
            }
        }
    }

    @Test func f16EncodeMatchesFloat16() {
        // Every half value, the midpoints between neighbours (ties), and points just beside them.
        var rng = SplitMix(seed: 7)
        var samples: [Float] = [65519.996, 65520, 65536, 1e-9, 2.98e-8, 2.9802322e-08, 5.9604645e-08, -0.0]
        for bits in UInt16(0)..<0x7c00 {
            let a = Float(Float16(bitPattern: bits))
            let b = Float(Float16(bitPattern: bits + 1))
            let mid = (a + b) / 2
            samples += [a, -a, mid, -mid, mid.nextUp, mid.nextDown]
        }
        for _ in 0..<200_000 { samples.append(Float(bitPattern: UInt32(truncatingIfNeeded: rng.next()))) }
        for x in samples {
            let ours = HalfFloat.f16(from: x)
            let swift = Float16(x)
            if swift.isNaN {
                #expect(HalfFloat.float(fromF16: ours).isNaN)
            } else if ours != swift.bitPattern {
                Issue.record("f16(\(x)) = \(ours), Float16 says \(swift.bitPattern)")
                return
            }
        }
    }

    @Test func bf16RoundsToNearestEven() {
        #expect(HalfFloat.bf16(from: 1.0) == 0x3f80)
        #expect(HalfFloat.bf16(from: Float(bitPattern: 0x3f80_8000)) == 0x3f80)  // tie, even stays
        #expect(HalfFloat.bf16(from: Float(bitPattern: 0x3f81_8000)) == 0x3f82)  // tie, odd rounds up
        #expect(HalfFloat.bf16(from: Float(bitPattern: 0x3f80_8001)) == 0x3f81)  // above tie
        #expect(HalfFloat.bf16(from: Float(bitPattern: 0x3f80_7fff)) == 0x3f80)  // below tie
        #expect(HalfFloat.bf16(from: .greatestFiniteMagnitude) == 0x7f80)     // rounds to inf
        #expect(HalfFloat.bf16(from: -.infinity) == 0xff80)
        #expect(HalfFloat.bf16(from: Float(bitPattern: 0x0000_8001)) == 0x0001)  // subnormal rounds up
        #expect(HalfFloat.bf16(from: Float(bitPattern: 0x7f80_0001)) & 0x7fc0 == 0x7fc0)  // signalling NaN -> quiet NaN
        #expect(HalfFloat.float(fromBF16: 0x4049) == 3.140625)
        var rng = SplitMix(seed: 3)
        for _ in 0..<100_000 {
            let x = Float(bitPattern: UInt32(truncatingIfNeeded: rng.next()))
            guard x.isFinite else { continue }
            // Reference: pick the nearer of the two truncation neighbours in Double, ties to even.
            let lo = Float(bitPattern: x.bitPattern & 0xffff_0000)
            let hi = Float(bitPattern: (x.bitPattern & 0xffff_0000) &+ 0x1_0000)
            // Past the largest finite value the upper neighbour is infinity, which sits at 2^128 for rounding.
            let hiValue = hi.isInfinite ? (hi < 0 ? -0x1p128 : 0x1p128) : Double(hi)
            let dl = abs(Double(x) - Double(lo)), dh = abs(hiValue - Double(x))
            let expected: UInt16
            if dl < dh { expected = UInt16(lo.bitPattern >> 16) }
            else if dh < dl { expected = UInt16(hi.bitPattern >> 16) }
            else { expected = (lo.bitPattern >> 16) & 1 == 0 ? UInt16(lo.bitPattern >> 16) : UInt16(hi.bitPattern >> 16) }
            if HalfFloat.bf16(from: x) != expected {
                Issue.record("bf16(\(x)) = \(HalfFloat.bf16(from: x)), expected \(expected)")
                return
            }
        }
    }
}

/// A tiny deterministic generator for test data.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
