import Testing
import GraftTensor
import GraftTestSupport

/// The comparison helpers every parity and gradient test relies on must fail on NaN and infinity, never pass them.
@Suite struct ComparisonHelperTests {
    @Test func maxAbsDifferenceReportsNaNAndInfinity() {
        let ones = Tensor(shape: [4], values: [1, 1, 1, 1])
        let nanLast = Tensor(shape: [4], values: [1, 1, 1, .nan])
        let nanFirst = Tensor(shape: [4], values: [.nan, 1, 1, 1])
        let allNaN = Tensor(shape: [4], values: [.nan, .nan, .nan, .nan])
        let infinite = Tensor(shape: [4], values: [1, .infinity, 1, 1])
        #expect(maxAbsDifference(ones, ones) == 0)
        #expect(maxAbsDifference(ones, nanLast).isNaN)
        #expect(maxAbsDifference(nanFirst, ones).isNaN)
        #expect(maxAbsDifference(allNaN, allNaN).isNaN)
        #expect(maxAbsDifference(ones, infinite) == .infinity)
        #expect(maxAbsDifference(infinite, infinite).isNaN)
        #expect(maxAbsDifference(ones, Tensor(shape: [3], values: [1, 1, 1])) == .infinity)
        // What the tests write: a tolerance check fails on every one of these.
        for bad in [nanLast, nanFirst, allNaN, infinite] { #expect(!(maxAbsDifference(ones, bad) <= 1e-4)) }
    }

    @Test func runningWorstKeepsNaN() {
        #expect(worse(0.0, .nan).isNaN && worse(Double.nan, 0).isNaN && worse(1.0, 2) == 2)
        #expect(worstOf([1.0, .nan, 3], empty: 0).isNaN)
        #expect(worstOf([Float](), empty: 7) == 7)
        #expect(maxRelativeError([1, 2, .nan], [1, 2, 3]).isNaN)
        #expect(maxRelativeError([1, 2], [1, .nan]).isNaN)
        #expect(maxRelativeError([1, 2], [1, 2, 3]) == .infinity)
        #expect(maxRelativeError([1, 2.5], [1, 2]) == 0.25)
    }

    @Test func finiteDifferenceCheckFailsOnNaNGradientsAndObjectives() {
        let p = Tensor(shape: [3], values: [0.5, -1, 2]).requiringGrad()
        p.grad = Tensor(shape: [3], values: [1, .nan, 1])
        let nanGradient = finiteDifferenceCheck([("p", p)], step: 1e-3) { Double(p.pointer[0] + p.pointer[1] + p.pointer[2]) }
        #expect(nanGradient.worst.isNaN)
        p.grad = Tensor(shape: [3], values: [1, 1, 1])
        let nanObjective = finiteDifferenceCheck([("p", p)], step: 1e-3) { p.pointer[1] > -1 ? .nan : 0 }
        #expect(nanObjective.worst.isNaN)
        let right = finiteDifferenceCheck([("p", p)], step: 1e-3) { Double(p.pointer[0] + p.pointer[1] + p.pointer[2]) }
        #expect(right.worst < 1e-3)
    }

    @Test func gradientCheckRecordsAnIssueForANaNOutput() {
        withKnownIssue("a NaN forward output must fail the check") {
            GradientCheck().run("nan", inputs: [[1, 2]], shapes: [[2]], trainable: [false],
                                op: { _ in Tensor(shape: [2], values: [.nan, 1]) }, reference: { $0[0] })
        }
    }
}
