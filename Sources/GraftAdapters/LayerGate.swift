import Foundation
import GraftTensor

/// A learned on/off switch for one layer's adaptation (TAPS, Selective LoRA): a trainable score `s` and the hard
/// gate `I(s ≥ τ)`. The forward pass uses the hard value; the backward pass the straight-through estimator
/// (`∂I/∂s = 1`), so a switched-off layer's score still learns whether switching it back on would lower the loss.
public final class LayerGate {
    /// The score `[1]`.
    public let score: Tensor
    /// The threshold `τ`.
    public let threshold: Float

    /// A gate with its score at `initialScore`.
    public init(initialScore: Float, threshold: Float) {
        score = Tensor(shape: [1], values: [initialScore]).requiringGrad()
        self.threshold = threshold
    }

    /// Whether the layer adapts: `s ≥ τ` (false for a NaN score).
    public var isOn: Bool { score.item >= threshold }

    /// The gate recorded for autograd: value `I(s ≥ τ)`, gradient 1 with respect to `s`.
    func recorded() -> Tensor {
        let hard: Float = isOn ? 1 : 0
        return score + Tensor(shape: [1], values: [hard - score.item])
    }
}

/// The L1 penalty `λ · Σ |s|` on an adapter's gate scores (the sparsity term that switches layers off), and the
/// gates' story for the training log (which switched) and `graft train --report` (which stay on).
public final class GatePenalty: AdapterTrainingHook {
    let method: String
    let paths: [String]
    let gates: [LayerGate]
    /// `λ`.
    public let weight: Float
    private var previous: [Bool]
    private var pending: [String] = []

    /// The penalty over `gates` (one per module path) with weight `weight`.
    public init(method: String, gates: [(String, LayerGate)], weight: Float) {
        self.method = method
        paths = gates.map(\.0)
        self.gates = gates.map(\.1)
        self.weight = weight
        previous = self.gates.map(\.isOn)
    }

    /// Module paths whose gate is on, in layer order.
    public var layersOn: [String] { zip(paths, gates).filter { $0.1.isOn }.map(\.0) }

    public func regularization() -> Tensor? {
        guard weight > 0, !gates.isEmpty else { return nil }
        var total: Tensor?
        for g in gates {
            // |s| = s · sign(s): the subgradient sign(s) (0 at 0).
            let sign: Float = g.score.item > 0 ? 1 : (g.score.item < 0 ? -1 : 0)
            let term = g.score * sign
            total = total.map { $0 + term } ?? term
        }
        return total.map { $0 * weight }
    }

    public func didUpdate(step: Int, totalSteps: Int) {
        let now = gates.map(\.isOn)
        let flipped = paths.indices.filter { now[$0] != previous[$0] }
        if !flipped.isEmpty {
            let what = flipped.map { "\(paths[$0]) \(now[$0] ? "on" : "off")" }.joined(separator: ", ")
            pending.append("\(method) step \(step): \(what); \(now.filter { $0 }.count)/\(gates.count) layers adapting")
        }
        previous = now
    }

    public func takeLogLines() -> [String] {
        defer { pending.removeAll() }
        return pending
    }

    public func reportLines() -> [String] {
        var lines = ["\(method) gates: \(layersOn.count) of \(gates.count) layers adapting (τ = \(threshold), λ = \(weight))"]
        for (path, g) in zip(paths, gates) {
            lines.append(String(format: "  %@: %@ (score %.4f)", path, g.isOn ? "on" : "off", g.score.item))
        }
        return lines
    }

    private var threshold: Float { gates.first?.threshold ?? 0 }
}

extension AdapterMethodFactory {
    /// A gate score and threshold from `init_score` (default 1) and `threshold` (default 0.1), and the penalty
    /// weight `l1_weight` (default 1e-3), checked.
    static func gateOptions(_ config: AdapterConfig) throws -> (score: Float, threshold: Float, weight: Float) {
        let score = try config.double("init_score", default: 1), tau = try config.double("threshold", default: 0.1)
        let weight = try config.double("l1_weight", default: 1e-3)
        guard score.isFinite, tau.isFinite, weight.isFinite, weight >= 0 else {
            throw GraftError.invalid("\(config.source): 'init_score', 'threshold' must be finite and 'l1_weight' finite and ≥ 0 (got \(score), \(tau), \(weight))")
        }
        return (Float(score), Float(tau), Float(weight))
    }
}
