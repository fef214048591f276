import Foundation
import Testing
@testable import GraftTensor
import GraftTestSupport

@Suite struct VectorMathTests {
    @Test func vexpMatchesTheCLibraryWithinTwoUlp() {
        var worst: Float = 0
        var x: Float = -87
        while x < 88 {
            var v = Float16x(repeating: 0)
            for j in 0..<16 { v[j] = x + Float(j) * 0.0037 }
            let r = vexp(v)
            for j in 0..<16 {
                let exact = Foundation.exp(Double(v[j]))
                worst = worse(worst, Float(abs(Double(r[j]) - exact) / exact))
            }
            x += 0.05
        }
        #expect(worst < 3e-7, "worst relative error \(worst)")
    }

    @Test func verfMatchesTheCLibrary() {
        var worst: Double = 0
        var x: Float = -6
        while x < 6 {
            var v = Float16x(repeating: 0)
            for j in 0..<16 { v[j] = x + Float(j) * 0.00071 }
            let r = verf(v)
            for j in 0..<16 { worst = worse(worst, abs(Double(r[j]) - Foundation.erf(Double(v[j])))) }
            x += 0.01
        }
        #expect(worst < 5e-7, "worst absolute error \(worst)")
    }
}
