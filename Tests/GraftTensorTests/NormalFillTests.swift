import Foundation
import Testing
import GraftTensor

/// ``GraftRNG/fillNormal(_:count:)``: the bulk standard-normal generator noise-sampling methods (PVeRA) draw from
/// every step. Its samples must have the moments and tail mass of N(0, 1), be finite, and repeat for a seed.
@Suite struct NormalFillTests {
    @Test func samplesFollowTheStandardNormal() {
        var rng = GraftRNG(seed: 2024)
        let count = 400_001  // odd: the last pair's sine is dropped
        var values = [Float](repeating: .nan, count: count)
        values.withUnsafeMutableBufferPointer { rng.fillNormal($0.baseAddress!, count: count) }
        let finite = values.allSatisfy { $0.isFinite }
        #expect(finite, "a sample is NaN or infinite")
        let n = Double(count)
        let mean = values.reduce(0.0) { $0 + Double($1) } / n
        let variance = values.reduce(0.0) { $0 + (Double($1) - mean) * (Double($1) - mean) } / n
        let skew = values.reduce(0.0) { $0 + pow(Double($1) - mean, 3) } / n
        let kurtosis = values.reduce(0.0) { $0 + pow(Double($1) - mean, 4) } / n
        // P(|z| > 2) = 0.0455 and P(|z| > 3) = 0.0027 for N(0, 1).
        let beyond2 = Double(values.filter { abs($0) > 2 }.count) / n, beyond3 = Double(values.filter { abs($0) > 3 }.count) / n
        print("fillNormal: mean \(mean), variance \(variance), skew \(skew), kurtosis \(kurtosis), P(|z|>2) \(beyond2), P(|z|>3) \(beyond3)")
        #expect(abs(mean) < 0.01)
        #expect(abs(variance - 1) < 0.01)
        #expect(abs(skew) < 0.02)
        #expect(abs(kurtosis - 3) < 0.05)
        #expect(abs(beyond2 - 0.0455) < 0.002)
        #expect(abs(beyond3 - 0.0027) < 0.0004)
        // Neighbouring samples (a pair's cosine and sine) are uncorrelated.
        var lag = 0.0
        for i in stride(from: 0, to: count - 1, by: 2) { lag += Double(values[i]) * Double(values[i + 1]) }
        #expect(abs(lag / (n / 2)) < 0.01)
    }

    @Test func aSeedRepeatsItsSamples() {
        var a = GraftRNG(seed: 7), b = GraftRNG(seed: 7)
        var x = [Float](repeating: 0, count: 33), y = [Float](repeating: 1, count: 33)
        x.withUnsafeMutableBufferPointer { a.fillNormal($0.baseAddress!, count: 33) }
        y.withUnsafeMutableBufferPointer { b.fillNormal($0.baseAddress!, count: 33) }
        #expect(x == y)
    }
}
