import Foundation
import GraftModels
import GraftTensor

/// How a per-token feed-forward dispatcher (DyT, Duo-LLM) turns its router's scores into the choice a token takes.
public enum TokenDispatchMode: String, Sendable, CaseIterable {
    /// Each token takes its highest-scoring choice, and only the tokens that chose a module run it (inference; the
    /// router gets no gradient).
    case hard
    /// Training: the forward pass takes the hard choice (after Gumbel noise on the scores), the backward pass the
    /// relaxed one's gradient (straight-through); every module runs on every token so the gradient exists.
    case straightThrough = "straight_through"
    /// The relaxed choice itself: each module's output weighted by its probability (for gradient checks).
    case soft
}

/// Running a module on a subset of a pass's tokens: gather the rows, run, scatter the output back (zeros
/// elsewhere), through one-hot products so gradients reach the input and the module.
enum TokenDispatch {
    /// `f` applied to the rows `rows` (ascending) of `x` `[T, h]`, as `[T, f-width]` with zeros at the other rows.
    static func onRows(_ x: Tensor, _ rows: [Int], width: Int, _ f: (Tensor) -> Tensor) -> Tensor {
        let t = x.rows
        if rows.count == t { return f(x) }
        guard !rows.isEmpty else { return Tensor(zeros: [t, width]) }
        var onehot = [Float](repeating: 0, count: rows.count * t)
        for (i, r) in rows.enumerated() { onehot[i * t + r] = 1 }
        let selection = Tensor(shape: [rows.count, t], values: onehot)
        return matmul(selection, f(matmul(selection, x)), transposeA: true)
    }

    /// Standard Gumbel noise from `rng` (−log(−log u), u clamped away from 0 and 1).
    static func gumbel(_ rng: inout GraftRNG) -> Float {
        let u = min(max(rng.nextUniform(), 1e-7), 1 - 1e-7)
        return -Foundation.log(-Foundation.log(u))
    }

    /// `hard` in the forward pass with the gradient of `soft` (same shape): `hard + soft − stop_gradient(soft)`.
    static func straightThrough(hard: Tensor, soft: Tensor) -> Tensor { soft + (hard - soft.detached()) }

    /// Throws unless `layers` (nil: every layer) are distinct indices of a decoder of `count` layers; `method`
    /// names the method in the message.
    static func checkLayers(_ layers: [Int]?, count: Int, method: String) throws {
        let layers = layers ?? Array(0..<count)
        guard !layers.isEmpty, layers.allSatisfy({ (0..<count).contains($0) }), Set(layers).count == layers.count else {
            throw GraftError.invalid("\(method): layers \(layers) must be distinct indices in 0..<\(count)")
        }
    }

    /// The mean of the scalar tensors `values` and, when `weight` is not 0, the penalty `weight · (mean − target)²`
    /// (both recorded for autograd); nil when `values` is empty.
    static func targetPenalty(_ values: [Tensor], target: Float, weight: Float) -> (mean: Tensor, penalty: Tensor?)? {
        guard let first = values.first else { return nil }
        let total = values.dropFirst().reduce(first) { $0 + $1 }
        let mean = total * (1 / Float(values.count))
        guard weight != 0 else { return (mean, nil) }
        let gap = mean - Tensor(scalar: target)
        return (mean, gap * gap * weight)
    }
}

/// A feed-forward block that routes each token among modules (DyT, Duo-LLM).
public protocol TokenDispatchBlock: FeedForwardBlock {
    /// `model.layers.N.mlp`.
    var path: String { get }
    /// How the router's scores become choices.
    var mode: TokenDispatchMode { get set }
    /// Every tensor that trains.
    var trainableTensors: [Tensor] { get }
    /// What the router chose since the last reset.
    var statistics: RouterLayerStatistics { get set }
    /// Empty statistics for this block's router.
    func emptyStatistics() -> RouterLayerStatistics
}

extension LlamaModel {
    /// The feed-forward blocks of type `B`, in layer order.
    func tokenDispatchBlocks<B: TokenDispatchBlock>(_: B.Type) -> [B] { layers.compactMap { $0.feedForwardOverride as? B } }
}

extension Array where Element: TokenDispatchBlock {
    /// Sets every block's mode.
    func setMode(_ mode: TokenDispatchMode) { for b in self { b.mode = mode } }
    /// Every block's trainable tensors, marked as requiring gradients.
    var markedTrainable: [Tensor] { flatMap(\.trainableTensors).map { $0.requiringGrad() } }
    /// Clears every block's statistics.
    func resetStatistics() { for b in self { b.statistics = b.emptyStatistics() } }
}

extension LlamaModel {
    /// The mean next-token cross-entropy of `batch` over `targets` (`[batch · length]`, -100 ignored), recorded for
    /// autograd: the part the training losses of the feed-forward routers share (DyT, Duo-LLM, MoE bases, Dr.LLM,
    /// Mixture-of-Recursions) before each adds its own terms. `method` names the method in errors.
    func nextTokenLoss(batch: TokenBatch, targets: [Int32], method: String) throws -> Tensor {
        guard targets.count == batch.batchSize * batch.length else {
            throw GraftError.invalid("\(method): \(targets.count) targets for a batch of \(batch.batchSize)×\(batch.length) tokens")
        }
        let hidden = try hiddenStates(batch)
        return crossEntropy(lmHead.forward(hidden.reshaped([batch.batchSize * batch.length, config.hiddenSize])), targets: targets)
    }
}

extension LlamaDecoderLayer {
    /// The dense SwiGLU feed-forward block on `x` (its projections, with any adapters on them).
    func denseFeedForward(_ x: Tensor) -> Tensor { downProj.forward(swiglu(gateProj.forward(x), upProj.forward(x))) }
}
