import GraftTensor

/// MOS, model surgery for pre-trained-model-based class-incremental learning (Sun et al., AAAI 2025): one adapter
/// per task, kept close to the earlier ones by **adapter merging**, and the right adapter for an input found by
/// **self-refined retrieval**, with no stored samples.
///
/// - Adapter merging: while task `t > 0` trains, after every optimizer step each of its adapter tensors becomes
///   `θₜ ← (1 − m)·θₜ + m·(θ₀ + … + θₜ₋₁)/t` (``mergeTowardPrevious(_:previousSum:previousCount:momentum:)``),
///   an exponential pull toward the mean of the frozen earlier adapters that bridges them while the task keeps its
///   own information (the reference code's `adapter_momentum`, 0.1).
/// - Retrieval (``retrieve(baseFeature:adaptedFeature:base:adapted:classTask:maxIterations:)``): the frozen base
///   model's feature picks a class by its prototype classifier, hence a task; the input's feature under that task's
///   adapter is classified again by the adapted prototypes, which names a task again; this repeats until the task
///   no longer changes or `maxIterations` (4) is reached, and the last prediction stands.
public enum MOS {
    /// `θ ← (1 − m)·θ + m·Σ/n` for each tensor of the adapter being trained, in place; `previousSum[i]` is the sum
    /// of tensor `i` over the `previousCount` earlier adapters. Nothing changes for the first task (`n = 0`) or `m = 0`.
    public static func mergeTowardPrevious(_ current: [Tensor], previousSum: [Tensor], previousCount: Int, momentum: Float) throws {
        guard momentum >= 0, momentum <= 1 else { throw GraftError.invalid("MOS: adapter momentum must be in [0, 1], got \(momentum)") }
        guard previousCount > 0, momentum > 0 else { return }
        guard current.count == previousSum.count else {
            throw GraftError.invalid("MOS: \(current.count) adapter tensors but \(previousSum.count) running sums")
        }
        let keep = 1 - momentum, pull = momentum / Float(previousCount)
        for (k, (c, s)) in zip(current, previousSum).enumerated() {
            guard c.shape == s.shape else {
                throw GraftError.invalid("MOS: adapter tensor \(k) has shape \(c.shape), the earlier adapters' \(s.shape)")
            }
            let p = c.pointer, q = s.pointer
            for i in 0..<c.count { p[i] = keep * p[i] + pull * q[i] }
        }
    }

    /// The outcome of retrieving an adapter for one input.
    public struct Retrieval: Sendable, Equatable {
        /// The task whose adapter was used last.
        public let task: Int
        /// The class the adapted prototypes predict under that adapter.
        public let prediction: Int
        /// How many times an adapted feature was classified.
        public let iterations: Int
    }

    /// Self-refined retrieval for one input. `baseFeature` is its feature without adapters, `adaptedFeature(t)` its
    /// feature under task `t`'s adapter; `base` classifies base features (prototypes of the frozen model), `adapted`
    /// classifies adapted features (each class's prototype taken under its own task's adapter); `classTask[c]` is
    /// the task that introduced class `c`.
    public static func retrieve(baseFeature: UnsafeBufferPointer<Float>, adaptedFeature: (Int) throws -> [Float],
                                base: PrototypeClassifier, adapted: PrototypeClassifier, classTask: [Int],
                                maxIterations: Int = 4) throws -> Retrieval {
        guard maxIterations >= 1 else { throw GraftError.invalid("MOS: maxIterations must be at least 1, got \(maxIterations)") }
        func task(of c: Int) throws -> Int {
            guard c >= 0, c < classTask.count else { throw GraftError.invalid("MOS: class \(c) has no task (classTask has \(classTask.count) entries)") }
            return classTask[c]
        }
        var current = try task(of: try base.predict(baseFeature))
        var iterations = 0
        while true {
            iterations += 1
            let feature = try adaptedFeature(current)
            let prediction = try feature.withUnsafeBufferPointer { try adapted.predict($0) }
            let next = try task(of: prediction)
            if next == current || iterations >= maxIterations {
                return Retrieval(task: current, prediction: prediction, iterations: iterations)
            }
            current = next
        }
    }
}

/// A nearest-prototype classifier on features: class `c`'s logit is the cosine similarity between the feature and
/// its prototype (the mean feature of the class), as MOS's and the incremental adapter tuning's prototype heads.
public struct PrototypeClassifier: Sendable {
    /// The feature size.
    public let dimension: Int
    /// Prototypes by class, `dimension` floats each.
    public private(set) var prototypes: [[Float]] = []

    /// An empty classifier for features of `dimension` floats.
    public init(dimension: Int) { self.dimension = dimension }

    /// Sets class `c`'s prototype to the mean of `features` (`[n, dimension]`, `n ≥ 1`); classes are numbered in
    /// order, so `c` is at most the number of classes so far.
    public mutating func setPrototype(class c: Int, meanOf features: Tensor) throws {
        guard features.shape.count == 2, features.shape[1] == dimension, features.shape[0] > 0 else {
            throw GraftError.invalid("prototype of class \(c): features of shape \(features.shape), need [n ≥ 1, \(dimension)]")
        }
        try setPrototype(class: c, Self.mean(features))
    }

    /// Sets class `c`'s prototype to `vector` directly.
    public mutating func setPrototype(class c: Int, _ vector: [Float]) throws {
        guard vector.count == dimension, vector.allSatisfy(\.isFinite) else {
            throw GraftError.invalid("prototype of class \(c): \(vector.count) values (need \(dimension) finite values)")
        }
        guard c >= 0, c <= prototypes.count else { throw GraftError.invalid("prototype of class \(c): classes so far are 0..<\(prototypes.count)") }
        if c == prototypes.count { prototypes.append(vector) } else { prototypes[c] = vector }
    }

    /// The mean row of `features` (`[n, d]`), accumulated in Double.
    public static func mean(_ features: Tensor) -> [Float] {
        let n = features.shape[0], d = features.count / max(n, 1)
        var acc = [Double](repeating: 0, count: d)
        let p = features.pointer
        for r in 0..<n { for j in 0..<d { acc[j] += Double(p[r * d + j]) } }
        return acc.map { Float($0 / Double(max(n, 1))) }
    }

    /// Cosine similarity of `feature` to each prototype.
    public func logits(_ feature: UnsafeBufferPointer<Float>) throws -> [Float] {
        guard feature.count == dimension else { throw GraftError.invalid("prototype classifier: feature of \(feature.count) values, need \(dimension)") }
        var fn = 0.0
        for x in feature { fn += Double(x) * Double(x) }
        guard fn.isFinite else { throw GraftError.invalid("prototype classifier: the feature holds NaN or Inf") }
        return prototypes.map { p in
            var dot = 0.0, pn = 0.0
            for j in 0..<dimension {
                dot += Double(p[j]) * Double(feature[j])
                pn += Double(p[j]) * Double(p[j])
            }
            let denominator = (fn * pn).squareRoot()
            return denominator > 0 ? Float(dot / denominator) : 0
        }
    }

    /// The class with the largest cosine similarity (the first on a tie).
    public func predict(_ feature: UnsafeBufferPointer<Float>) throws -> Int {
        guard !prototypes.isEmpty else { throw GraftError(.state, "prototype classifier: no class has a prototype yet") }
        let l = try logits(feature)
        var best = 0
        for c in 1..<l.count where l[c] > l[best] { best = c }
        guard l[best].isFinite else { throw GraftError.invalid("prototype classifier: the feature holds NaN or Inf") }
        return best
    }
}
