import GraftTensor

/// Updates trainable parameters from their gradients.
public protocol Optimizer: AnyObject {
    /// The parameters this optimizer updates, in a fixed order (checkpoints rely on it).
    var parameters: [Tensor] { get }
    /// The learning rate used by the next ``step()``; schedules set it before each step.
    var learningRate: Float { get set }
    /// Applies one update from the parameters' current `grad` (parameters without a gradient are skipped).
    func step()
    /// The optimizer's state (moments, step count) as named flat arrays, for checkpoints.
    func stateDict() -> [String: [Float]]
    /// Restores state written by ``stateDict()``; throws naming the entry that does not fit.
    func loadStateDict(_ state: [String: [Float]]) throws
    /// Forgets the state (moments, momentum) of `parameters`, as if they had never been updated: for a
    /// parameter a training hook re-purposes (LoSiA's sub-network after it moves).
    func resetState(of parameters: [Tensor])
}

extension Optimizer {
    /// Clears every parameter's gradient.
    public func zeroGrad() {
        for p in parameters { p.grad = nil }
    }
}

/// AdamW (Loshchilov & Hutter): Adam with bias correction and weight decay decoupled from the gradient,
/// applied as `p ← p − lr·(m̂/(√v̂ + eps) + wd·p)` exactly as `torch.optim.AdamW` does.
public final class AdamW: Optimizer {
    public let parameters: [Tensor]
    public var learningRate: Float
    /// Exponential decay of the first and second moments.
    public let beta1: Float, beta2: Float
    /// Added to √v̂.
    public let eps: Float
    /// Decoupled weight decay coefficient.
    public let weightDecay: Float
    /// Number of updates taken.
    public private(set) var stepCount: Int = 0
    /// A factor on the learning rate per parameter (parameter groups, as μP's per-group rates); nil: 1 for all.
    /// Weight decay follows each parameter's own rate, as in a PyTorch parameter group.
    public var learningRateScales: [Float]?
    private var m: [Tensor]
    private var v: [Tensor]

    /// Creates the optimizer with PyTorch's defaults for the unspecified values.
    public init(parameters: [Tensor], learningRate: Float = 1e-3, beta1: Float = 0.9, beta2: Float = 0.999,
                eps: Float = 1e-8, weightDecay: Float = 0.01) {
        self.parameters = parameters
        self.learningRate = learningRate
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weightDecay = weightDecay
        m = parameters.map { Tensor(zeros: $0.shape) }
        v = parameters.map { Tensor(zeros: $0.shape) }
    }

    public func step() {
        stepCount += 1
        // Bias corrections in Double, as PyTorch computes them in Python floats.
        let bc1 = 1 - pow(Double(beta1), Double(stepCount))
        let bc2 = 1 - pow(Double(beta2), Double(stepCount))
        let bc2Sqrt = Float(bc2.squareRoot())
        for (i, p) in parameters.enumerated() {
            guard let g = p.grad else { continue }
            let rate = learningRate * (learningRateScales.map { i < $0.count ? $0[i] : 1 } ?? 1)
            let stepSize = Float(Double(rate) / bc1)
            let decay = 1 - rate * weightDecay
            let pp = p.pointer, pg = g.pointer, pm = m[i].pointer, pv = v[i].pointer
            let b1 = beta1, b2 = beta2, e = eps
            for j in 0..<p.count {
                pp[j] *= decay
                let gj = pg[j]
                pm[j] = b1 * pm[j] + (1 - b1) * gj
                pv[j] = b2 * pv[j] + (1 - b2) * gj * gj
                let denom = pv[j].squareRoot() / bc2Sqrt + e
                pp[j] -= stepSize * pm[j] / denom
            }
        }
    }

    public func stateDict() -> [String: [Float]] {
        var d: [String: [Float]] = ["step": [Float(stepCount)]]
        for i in parameters.indices {
            d["m.\(i)"] = m[i].scalars
            d["v.\(i)"] = v[i].scalars
        }
        return d
    }

    public func loadStateDict(_ state: [String: [Float]]) throws {
        guard let s = state["step"]?.first else { throw GraftError.format("optimizer state: missing 'step'") }
        for i in parameters.indices {
            for (key, t) in [("m.\(i)", m[i]), ("v.\(i)", v[i])] {
                guard let values = state[key] else { throw GraftError.format("optimizer state: missing '\(key)'") }
                guard values.count == t.count else {
                    throw GraftError.format("optimizer state: '\(key)' has \(values.count) values, parameter \(i) has \(t.count)")
                }
                values.withUnsafeBufferPointer { if let base = $0.baseAddress { t.pointer.update(from: base, count: t.count) } }
            }
        }
        stepCount = Int(s)
    }

    public func resetState(of reset: [Tensor]) {
        let ids = Set(reset.map(ObjectIdentifier.init))
        for (i, p) in parameters.enumerated() where ids.contains(ObjectIdentifier(p)) {
            m[i].pointer.update(repeating: 0, count: m[i].count)
            v[i].pointer.update(repeating: 0, count: v[i].count)
        }
    }
}

/// SGD with optional momentum (PyTorch's formulation: `b ← μ·b + g`, `p ← p − lr·b`) and L2 weight decay.
public final class SGD: Optimizer {
    public let parameters: [Tensor]
    public var learningRate: Float
    /// Momentum coefficient (0 = plain SGD).
    public let momentum: Float
    /// L2 penalty added to the gradient.
    public let weightDecay: Float
    private var buffers: [Tensor?]

    /// Creates the optimizer.
    public init(parameters: [Tensor], learningRate: Float, momentum: Float = 0, weightDecay: Float = 0) {
        self.parameters = parameters
        self.learningRate = learningRate
        self.momentum = momentum
        self.weightDecay = weightDecay
        buffers = parameters.map { _ in nil }
    }

    public func step() {
        for (i, p) in parameters.enumerated() {
            guard let g = p.grad else { continue }
            let pp = p.pointer, pg = g.pointer
            if momentum == 0 {
                for j in 0..<p.count { pp[j] -= learningRate * (pg[j] + weightDecay * pp[j]) }
                continue
            }
            let first = buffers[i] == nil
            let buf = buffers[i] ?? Tensor(zeros: p.shape)
            buffers[i] = buf
            let pb = buf.pointer
            for j in 0..<p.count {
                let gj = pg[j] + weightDecay * pp[j]
                pb[j] = first ? gj : momentum * pb[j] + gj
                pp[j] -= learningRate * pb[j]
            }
        }
    }

    public func stateDict() -> [String: [Float]] {
        var d: [String: [Float]] = [:]
        for (i, b) in buffers.enumerated() { if let b { d["momentum.\(i)"] = b.scalars } }
        return d
    }

    public func loadStateDict(_ state: [String: [Float]]) throws {
        for i in parameters.indices {
            guard let values = state["momentum.\(i)"] else { buffers[i] = nil; continue }
            guard values.count == parameters[i].count else {
                throw GraftError.format("optimizer state: 'momentum.\(i)' has \(values.count) values, parameter has \(parameters[i].count)")
            }
            buffers[i] = Tensor(shape: parameters[i].shape, values: values)
        }
    }

    public func resetState(of reset: [Tensor]) {
        let ids = Set(reset.map(ObjectIdentifier.init))
        for (i, p) in parameters.enumerated() where ids.contains(ObjectIdentifier(p)) { buffers[i] = nil }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Scales all gradients so their global L2 norm is at most `maxNorm`; returns the norm before clipping.
@discardableResult
public func clipGradientNorm(_ parameters: [Tensor], maxNorm: Float?) -> Float {
    var total: Double = 0
    for p in parameters {
        guard let g = p.grad else { continue }
        let pg = g.pointer
        for j in 0..<g.count { total += Double(pg[j]) * Double(pg[j]) }
    }
    let norm = Float(total.squareRoot())
    if let maxNorm, norm > maxNorm, norm > 0 {
        let scale = maxNorm / (norm + 1e-6)
        for p in parameters { p.grad?.scaleInPlace(scale) }
    }
    return norm
}
