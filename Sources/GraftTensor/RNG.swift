/// A small, fast, reproducible pseudo-random generator (xoshiro256**), seeded by SplitMix64.
///
/// Its whole state is four words, so checkpoints can save and restore it exactly.
public struct GraftRNG: RandomNumberGenerator, Sendable, Equatable {
    /// The generator state.
    public var state: (UInt64, UInt64, UInt64, UInt64)

    /// Seeds the generator.
    public init(seed: UInt64) {
        var s = seed
        func splitmix() -> UInt64 {
            s &+= 0x9E37_79B9_7F4A_7C15
            var z = s
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        state = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    /// Restores a saved state.
    public init(state: [UInt64]) {
        self.state = (state[0], state[1], state[2], state[3])
    }

    /// The state as four words, for checkpoints.
    public var stateWords: [UInt64] { [state.0, state.1, state.2, state.3] }

    public static func == (a: GraftRNG, b: GraftRNG) -> Bool { a.stateWords == b.stateWords }

    @inline(__always) private static func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }

    /// The next 64 random bits.
    public mutating func next() -> UInt64 {
        let result = GraftRNG.rotl(state.1 &* 5, 7) &* 9
        let t = state.1 << 17
        state.2 ^= state.0
        state.3 ^= state.1
        state.1 ^= state.2
        state.0 ^= state.3
        state.2 ^= t
        state.3 = GraftRNG.rotl(state.3, 45)
        return result
    }

    /// A uniform Float in [0, 1).
    public mutating func nextUniform() -> Float {
        Float(next() >> 40) * (1.0 / Float(1 << 24))
    }

    /// A standard normal sample (Box-Muller).
    public mutating func nextNormal() -> Float {
        var u1 = Double(next() >> 11) * (1.0 / Double(1 << 53))
        if u1 < 1e-300 { u1 = 1e-300 }
        let u2 = Double(next() >> 11) * (1.0 / Double(1 << 53))
        return Float((-2 * _log(u1)).squareRoot() * _cos(2 * Double.pi * u2))
    }
}

extension GraftRNG {
    /// Fills `count` floats at `p` with N(0, 1) samples: single-precision Box–Muller using both values of each pair
    /// (cosine and sine), about four times the rate of ``nextNormal()``, for noise drawn afresh every step.
    public mutating func fillNormal(_ p: UnsafeMutablePointer<Float>, count: Int) {
        var i = 0
        while i < count {
            // u1 in (0, 1]: 24 random bits plus one, so the logarithm stays finite.
            let u1 = Float((next() >> 40) + 1) * (1.0 / Float(1 << 24))
            let u2 = Float(next() >> 40) * (1.0 / Float(1 << 24))
            let radius = (-2 * logf(u1)).squareRoot(), angle = 2 * Float.pi * u2
            p[i] = radius * cosf(angle)
            if i + 1 < count { p[i + 1] = radius * sinf(angle) }
            i += 2
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
@inline(__always) func _log(_ x: Double) -> Double { log(x) }
@inline(__always) func _cos(_ x: Double) -> Double { cos(x) }

extension Tensor {
    /// A tensor of independent N(0, std²) samples.
    public static func randomNormal(_ shape: [Int], std: Float = 1, rng: inout GraftRNG) -> Tensor {
        let t = Tensor(zeros: shape)
        for i in 0..<t.count { t.pointer[i] = rng.nextNormal() * std }
        return t
    }

    /// A tensor of independent U(low, high) samples.
    public static func randomUniform(_ shape: [Int], low: Float, high: Float, rng: inout GraftRNG) -> Tensor {
        let t = Tensor(zeros: shape)
        for i in 0..<t.count { t.pointer[i] = low + (high - low) * rng.nextUniform() }
        return t
    }
}
