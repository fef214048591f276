import Foundation
import Testing
@testable import GraftAdapters
import GraftTensor
import GraftTestSupport

/// The defining math of MOS (adapter merging toward the earlier adapters' mean, self-refined retrieval over
/// prototype classifiers) and of incremental adapter tuning (semantic shift compensation of old prototypes).
/// Every comparison fails on NaN/Inf.
@Suite struct ContinualLearningTests {
    static func close(_ a: Float, _ b: Float, _ tol: Float = 1e-5) -> Bool { a.isFinite && b.isFinite && abs(a - b) <= tol }

    @Test func mosMergePullsTowardTheMeanOfEarlierAdapters() throws {
        let current = Tensor(shape: [3], values: [1, 2, 3])
        // Two earlier adapters summing to [4, 0, −2]: mean [2, 0, −1].
        let sum = Tensor(shape: [3], values: [4, 0, -2])
        try MOS.mergeTowardPrevious([current], previousSum: [sum], previousCount: 2, momentum: 0.1)
        let expected: [Float] = [0.9 * 1 + 0.1 * 2, 0.9 * 2, 0.9 * 3 - 0.1]
        for i in 0..<3 { #expect(Self.close(current.pointer[i], expected[i])) }
        // The first task and momentum 0 leave the adapter alone.
        try MOS.mergeTowardPrevious([current], previousSum: [sum], previousCount: 0, momentum: 0.1)
        try MOS.mergeTowardPrevious([current], previousSum: [sum], previousCount: 2, momentum: 0)
        for i in 0..<3 { #expect(Self.close(current.pointer[i], expected[i])) }
        #expect(throws: GraftError.self) { try MOS.mergeTowardPrevious([current], previousSum: [sum], previousCount: 1, momentum: 1.5) }
    }

    @Test func prototypeClassifierIsCosineToClassMeans() throws {
        var c = PrototypeClassifier(dimension: 2)
        try c.setPrototype(class: 0, meanOf: Tensor(shape: [2, 2], values: [1, 0, 3, 0]))
        try c.setPrototype(class: 1, [0, 5])
        #expect(c.prototypes[0] == [2, 0])
        let l = try [Float](arrayLiteral: 1, 1).withUnsafeBufferPointer { try c.logits($0) }
        #expect(Self.close(l[0], 1 / Float(2).squareRoot()) && Self.close(l[1], 1 / Float(2).squareRoot()))
        #expect(try [Float](arrayLiteral: 0.2, 1).withUnsafeBufferPointer { try c.predict($0) } == 1)
        #expect(throws: GraftError.self) { try [Float](arrayLiteral: .nan, 1).withUnsafeBufferPointer { try c.predict($0) } }
        #expect(throws: GraftError.self) { try c.setPrototype(class: 3, [1, 1]) }
    }

    @Test func retrievalRefinesUntilTheTaskIsStable() throws {
        // Classes 0, 1 from task 0; classes 2, 3 from task 1. The base model confuses the input with class 1
        // (task 0); under task 0's adapter it looks like class 2 (task 1); under task 1's adapter like class 3.
        var base = PrototypeClassifier(dimension: 2), adapted = PrototypeClassifier(dimension: 2)
        for (k, v) in [[1, 0], [0, 1], [-1, 0], [0, -1]].enumerated() {
            try base.setPrototype(class: k, v.map(Float.init))
            try adapted.setPrototype(class: k, v.map(Float.init))
        }
        let underAdapter: [[Float]] = [[-1, 0.1], [0.1, -1]]
        var asked: [Int] = []
        let r = try [Float](arrayLiteral: 0.1, 1).withUnsafeBufferPointer { f in
            try MOS.retrieve(baseFeature: f, adaptedFeature: { asked.append($0); return underAdapter[$0] },
                             base: base, adapted: adapted, classTask: [0, 0, 1, 1])
        }
        #expect(r == MOS.Retrieval(task: 1, prediction: 3, iterations: 2))
        #expect(asked == [0, 1])
        // A cap of one iteration keeps the first retrieval's answer.
        let once = try [Float](arrayLiteral: 0.1, 1).withUnsafeBufferPointer { f in
            try MOS.retrieve(baseFeature: f, adaptedFeature: { underAdapter[$0] }, base: base, adapted: adapted,
                             classTask: [0, 0, 1, 1], maxIterations: 1)
        }
        #expect(once == MOS.Retrieval(task: 0, prediction: 2, iterations: 1))
    }

    @Test func semanticShiftIsTheKernelWeightedMeanDrift() throws {
        // Two samples: drift [1, 0] near the prototype at the origin, drift [0, 10] far away.
        let before = Tensor(shape: [2, 2], values: [0, 0, 3, 0])
        let after = Tensor(shape: [2, 2], values: [1, 0, 3, 10])
        let sigma: Float = 1
        let (moved, shifts) = try IncrementalAdapterTuning.compensate(prototypes: [[0, 0]], before: before, after: after, sigma: sigma)
        let w0 = 1.0, w1 = exp(-9.0 / 2)
        let dx = Float(w0 * 1 / (w0 + w1)), dy = Float(w1 * 10 / (w0 + w1))
        #expect(Self.close(moved[0][0], dx) && Self.close(moved[0][1], dy))
        #expect(Self.close(shifts[0], (dx * dx + dy * dy).squareRoot()))
        // A uniform drift moves every prototype by exactly that drift, however far.
        let shifted = Tensor(shape: [2, 2], values: [0.5, 0, 3.5, 0])
        let (uniform, _) = try IncrementalAdapterTuning.compensate(prototypes: [[100, -100], [1, 1]], before: before, after: shifted, sigma: 0.5)
        #expect(Self.close(uniform[0][0], 100.5) && Self.close(uniform[0][1], -100) && Self.close(uniform[1][0], 1.5))
        #expect(throws: GraftError.self) {
            try IncrementalAdapterTuning.compensate(prototypes: [[.nan, 0]], before: before, after: after, sigma: 1)
        }
        #expect(throws: GraftError.self) { try IncrementalAdapterTuning.compensate(prototypes: [[0, 0]], before: before, after: after, sigma: 0) }
    }

    @Test func samplesFollowTheStoredGaussian() throws {
        var rng = GraftRNG(seed: 3)
        let s = IncrementalAdapterTuning.sample(mean: [2, -1], variance: [0.25, 4], count: 4000, rng: &rng)
        let m = PrototypeClassifier.mean(s)
        let v = IncrementalAdapterTuning.variance(s, mean: m, floor: 0)
        #expect(Self.close(m[0], 2, 0.05) && Self.close(m[1], -1, 0.15))
        #expect(Self.close(v[0], 0.25, 0.03) && Self.close(v[1], 4, 0.4))
    }
}
