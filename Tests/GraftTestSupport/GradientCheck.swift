import Foundation
import Testing
import GraftTensor

/// A finite-difference gradient check against a Float64 reference.
///
/// The op under test runs in Float32 with autograd; `reference` is an independent, naive Float64
/// implementation of the same function. The check asserts (1) the Float32 forward matches the reference and
/// (2) the analytic gradient of `Σ wᵢ·outᵢ` (random `w`) matches central differences of the reference
/// taken in Float64 (step 1e-6), for every element of every input marked trainable.
public struct GradientCheck {
    /// Largest accepted forward error (relative to max(1, |reference|)).
    public var forwardTolerance: Double = 1e-4
    /// Largest accepted gradient error (relative to max(1, |numeric|)).
    public var gradientTolerance: Double = 1e-3

    /// A check with the default tolerances.
    public init() {}

    /// Checks `op` against `reference` at `inputs`; `trainable` marks the inputs whose gradients are checked.
    public func run(
        _ label: String,
        inputs: [[Double]], shapes: [[Int]], trainable: [Bool],
        op: ([Tensor]) -> Tensor,
        reference: ([[Double]]) -> [Double],
        bound: [Tensor?] = [],
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        // Inputs may be bound to existing tensors (an adapter's own parameters): their values are set in place.
        let tensors = zip(inputs, shapes).enumerated().map { i, pair -> Tensor in
            if i < bound.count, let t = bound[i] {
                pair.0.enumerated().forEach { t.pointer[$0.offset] = Float($0.element) }
                t.grad = nil
                return t
            }
            return Tensor(shape: pair.1, values: pair.0.map(Float.init))
        }
        for (t, tr) in zip(tensors, trainable) where tr { t.requiringGrad() }
        let out = op(tensors)
        let refOut = reference(inputs)
        #expect(out.count == refOut.count, "\(label): output size \(out.count) vs reference \(refOut.count)",
                sourceLocation: sourceLocation)
        guard out.count == refOut.count else { return }
        let fwdErr = maxRelativeError(out.scalars.map(Double.init), refOut)
        #expect(fwdErr <= forwardTolerance, "\(label): forward error \(fwdErr)", sourceLocation: sourceLocation)

        var rng = GraftRNG(seed: 7)
        let weights = (0..<out.count).map { _ in Double(rng.nextNormal()) }
        let w = Tensor(shape: out.shape, values: weights.map(Float.init))
        let loss = sum(mul(out, w))
        loss.backward()

        let h = 1e-6
        for (i, tr) in trainable.enumerated() where tr {
            guard let grad = tensors[i].grad else {
                Issue.record("\(label): input \(i) got no gradient", sourceLocation: sourceLocation)
                continue
            }
            var numeric = [Double](repeating: 0, count: inputs[i].count)
            for j in 0..<inputs[i].count {
                var plus = inputs, minus = inputs
                plus[i][j] += h
                minus[i][j] -= h
                let fp = zip(reference(plus), weights).reduce(0) { $0 + $1.0 * $1.1 }
                let fm = zip(reference(minus), weights).reduce(0) { $0 + $1.0 * $1.1 }
                numeric[j] = (fp - fm) / (2 * h)
            }
            let err = maxRelativeError(grad.scalars.map(Double.init), numeric)
            #expect(err <= gradientTolerance, "\(label): gradient of input \(i) error \(err)",
                    sourceLocation: sourceLocation)
        }
    }
}

/// max |a − b| / max(1, max |b|): absolute for small values, relative for large ones. NaN when either side holds
/// a NaN, infinity when their sizes differ.
public func maxRelativeError(_ a: [Double], _ b: [Double]) -> Double {
    guard a.count == b.count else { return .infinity }
    let scale = worse(1, worstOf(b.map(abs), empty: 0))
    return worstOf(zip(a, b).map { abs($0 - $1) }, empty: 0) / scale
}

/// Deterministic inputs in [-1, 1].
public func randomValues(_ n: Int, seed: UInt64, scale: Double = 1) -> [Double] {
    var rng = GraftRNG(seed: seed)
    return (0..<n).map { _ in Double(rng.nextUniform() * 2 - 1) * scale }
}

/// What ``finiteDifferenceCheck(_:step:relativeStep:samples:skipKinks:report:value:)`` found.
public struct FiniteDifferenceResult {
    /// The worst error relative to `max(1, |numeric|)`; NaN when any analytic or numeric gradient was NaN.
    public var worst = 0.0
    /// Keys of tensors that got no gradient.
    public var missing: [String] = []
    /// Entries skipped because the objective has a kink there (one-sided slopes disagree).
    public var kinks = 0
}

/// Central differences of `value` (the objective, accumulated in Float64) against the analytic gradients already
/// in each tensor's `grad`. `step` is the difference step (times `max(1, |θ|)` when `relativeStep`); `samples`
/// limits each tensor to about that many evenly spaced entries (nil = every entry); `skipKinks` leaves out
/// entries whose one-sided slopes disagree by more than 5% (a top-k selection flipping inside the step). Prints
/// each entry worse than `report`.
public func finiteDifferenceCheck(_ params: [(key: String, tensor: Tensor)], step: Float, relativeStep: Bool = false,
                                  samples: Int? = nil, skipKinks: Bool = false, report: Double = .infinity,
                                  value: () throws -> Double) rethrows -> FiniteDifferenceResult {
    var result = FiniteDifferenceResult()
    let center = skipKinks ? try value() : 0
    for (key, p) in params {
        guard let grad = p.grad else {
            result.missing.append(key)
            continue
        }
        for i in stride(from: 0, to: p.count, by: max(1, p.count / (samples ?? p.count))) {
            let saved = p.pointer[i]
            let h = relativeStep ? step * max(1, abs(saved)) : step
            p.pointer[i] = saved + h
            let up = try value()
            p.pointer[i] = saved - h
            let down = try value()
            p.pointer[i] = saved
            let numeric = (up - down) / Double(2 * h)
            if skipKinks {
                let right = (up - center) / Double(h), left = (center - down) / Double(h)
                if abs(right - left) > 0.05 * max(1, abs(numeric)) {
                    result.kinks += 1
                    continue
                }
            }
            let error = abs(Double(grad.pointer[i]) - numeric) / max(1, abs(numeric))
            if error > report { print("gradient mismatch \(key)[\(i)]: analytic \(grad.pointer[i]) numeric \(numeric)") }
            result.worst = worse(result.worst, error)
        }
    }
    return result
}
