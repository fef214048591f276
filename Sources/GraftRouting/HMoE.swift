import Foundation
import GraftModels
import GraftTensor
import GraftTrain

/// HMoE (Wang et al., 2024): a mixture of heterogeneous experts, experts of different sizes, with a loss that
/// makes the router favour the small ones so that fewer parameters run per token.
///
/// Graft makes the heterogeneous experts from a dense decoder, as MoEfication does with equal ones: the FFN's
/// intermediate neurons are clustered by co-activation into clusters of the given sizes
/// (``MoEficationOptions/expertSizes``), each cluster an expert, and a linear router is fitted to each expert's
/// importance. ``tuneRouters(model:inputs:options:progress:)`` then trains the routers with the paper's parameter
/// penalty: the Switch load-balancing form `E · Σₑ fₑ · Pₑ` with each expert's term weighted by its size over the
/// mean size (``sizePenalty(probs:plan:sizes:)``), beside a cross-entropy that keeps the router predicting the
/// experts' importance shares (the distillation target MoEfication's ridge fit solves in closed form).
/// Departure: the paper trains experts and routers from scratch; here the experts are the dense model's own.
public enum HMoE {
    /// HMoE's parameter penalty `E · Σₑ fₑ · (sₑ / s̄) · Pₑ` for router probabilities `probs` `[T, E]` under
    /// `plan`: `fₑ` the fraction of selections that chose expert `e`, `Pₑ` its mean probability, `sₑ` its size and
    /// `s̄` the mean size. 1 for uniform routing over equal experts; lower when the router's mass sits on small
    /// experts. Gradient flows through `P` only.
    public static func sizePenalty(probs: Tensor, plan: RoutePlan, sizes: [Int]) -> Tensor {
        let mean = Float(sizes.reduce(0, +)) / Float(max(sizes.count, 1))
        return MixtureLosses.loadBalancing(probs: probs, plan: plan, scale: sizes.map { Float($0) / max(mean, 1) })
    }

    /// Sizes for `experts` experts over `neurons` neurons growing geometrically by `ratio` from the smallest to the
    /// largest, each a multiple of `multiple` (the last absorbs the rounding); throws when they cannot be formed.
    public static func geometricSizes(experts: Int, neurons: Int, ratio: Double, multiple: Int = 16) throws -> [Int] {
        guard experts >= 1, ratio >= 1, ratio.isFinite, multiple >= 1, neurons >= experts * multiple else {
            throw GraftError.invalid("cannot form \(experts) expert sizes over \(neurons) neurons with ratio \(ratio) in multiples of \(multiple)")
        }
        let weights = (0..<experts).map { pow(ratio, Double($0) / Double(max(experts - 1, 1))) }
        let total = weights.reduce(0, +)
        var sizes = weights.map { max(multiple, Int((Double(neurons) * $0 / total / Double(multiple)).rounded()) * multiple) }
        sizes[experts - 1] += neurons - sizes.reduce(0, +)
        guard sizes[experts - 1] >= 1 else { throw GraftError.invalid("expert sizes \(sizes) do not fit \(neurons) neurons") }
        return sizes
    }

    /// Trains every MoE block's router of `model` on its feed-forward inputs (`inputs[layer]`, `[N, hidden]`, as
    /// ``MoEfication/collectFeedForwardInputs(model:sequences:maxTokens:progress:)`` returns) by full-batch Adam:
    /// the cross-entropy of the router's softmax against the experts' importance shares plus
    /// `options.penaltyWeight` times ``sizePenalty(probs:plan:sizes:)`` of its top-k routing. The experts stay
    /// frozen. Returns per layer the mean size-weighted activated neurons per token before and after.
    @discardableResult
    public static func tuneRouters(model: LlamaModel, inputs: [Tensor], options: HMoERouterOptions,
                                   progress: (String) -> Void = { _ in }) throws -> [(before: Double, after: Double)] {
        let blocks = model.moeBlocks
        guard !blocks.isEmpty, blocks.count == inputs.count else {
            throw GraftError(.state, "HMoE router tuning needs one input tensor per MoE block: \(inputs.count) for \(blocks.count) blocks")
        }
        guard options.steps >= 0, options.learningRate > 0, options.learningRate.isFinite,
              options.penaltyWeight >= 0, options.penaltyWeight.isFinite else {
            throw GraftError.invalid("HMoE router tuning: steps \(options.steps) must be ≥ 0, learning rate \(options.learningRate) > 0 and penalty \(options.penaltyWeight) ≥ 0")
        }
        var report: [(Double, Double)] = []
        for (i, (block, x)) in zip(blocks, inputs).enumerated() {
            guard x.rank == 2, x.lastDim == block.hiddenSize else {
                throw GraftError.invalid("HMoE router tuning: layer \(i)'s inputs have shape \(x.shape), expected [N, \(block.hiddenSize)]")
            }
            let importance = block.expertImportance(x)
            let shares = importanceShares(importance)
            let before = activatedNeurons(block, x)
            let w = block.routerWeight.requiringGrad(), b = block.routerBias.requiringGrad()
            let optimizer = AdamW(parameters: [w, b], learningRate: options.learningRate, weightDecay: 0)
            for step in 0..<options.steps {
                let loss = routerLoss(block, x, shares: shares, penalty: options.penaltyWeight)
                guard loss.item.isFinite else {
                    for p in [w, b] { _ = p.requiringGrad(false) }
                    throw GraftError(.state, "HMoE router tuning: layer \(i)'s loss is \(loss.item) at step \(step); lower the learning rate")
                }
                loss.backward()
                optimizer.step()
                optimizer.zeroGrad()
                if step == options.steps - 1 { progress(String(format: "layer %d: router loss %.4f", i, loss.item)) }
            }
            for p in [w, b] { _ = p.requiringGrad(false) }
            let after = activatedNeurons(block, x)
            report.append((before, after))
        }
        return report
    }

    /// The router objective of one block on inputs `x`: cross-entropy against `shares` plus the weighted penalty.
    static func routerLoss(_ block: MoEFeedForward, _ x: Tensor, shares: Tensor, penalty: Float) -> Tensor {
        let logits = block.routerLogits(x)
        let probs = softmax(logits)
        var loss = sum(shares * logSoftmax(logits)) * (-1 / Float(max(x.rows, 1)))
        if penalty > 0 {
            let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: probs.pointer, count: probs.count), tokens: x.rows,
                                      experts: block.experts, mode: .topK, topK: block.topK, topP: 1, capacityFactor: nil)
            loss = loss + sizePenalty(probs: probs, plan: plan, sizes: block.expertSizes) * penalty
        }
        return loss
    }

    /// Each row of `importance` `[T, E]` divided by its sum (uniform where the sum is 0).
    static func importanceShares(_ importance: Tensor) -> Tensor {
        let e = importance.lastDim, out = Tensor(zeros: importance.shape)
        for t in 0..<importance.rows {
            let row = importance.pointer + t * e, o = out.pointer + t * e
            var total: Float = 0
            for j in 0..<e { total += row[j] }
            for j in 0..<e { o[j] = total > 0 ? row[j] / total : 1 / Float(e) }
        }
        return out
    }

    /// The mean number of expert neurons the block's routing runs per token of `x` (sizes of the routed experts).
    public static func activatedNeurons(_ block: MoEFeedForward, _ x: Tensor) -> Double {
        withNoGrad {
            let probs = softmax(block.routerLogits(x))
            let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: probs.pointer, count: probs.count), tokens: x.rows,
                                      experts: block.experts, mode: block.topP == nil ? .topK : .topP, topK: block.topK,
                                      topP: block.topP ?? 1, capacityFactor: nil)
            var total = 0.0
            for i in 0..<plan.selected.count where plan.selected[i] != 0 { total += Double(block.expertSizes[i % block.experts]) }
            return total / Double(max(x.rows, 1))
        }
    }
}

/// Settings of ``HMoE/tuneRouters(model:inputs:options:progress:)``.
public struct HMoERouterOptions: Sendable {
    /// Full-batch Adam steps per layer.
    public var steps = 200
    /// Adam's learning rate.
    public var learningRate: Float = 1e-2
    /// Weight of the size penalty (0: only the importance cross-entropy).
    public var penaltyWeight: Float = 0.1
    /// Defaults: 200 steps at 1e-2, penalty 0.1.
    public init() {}
}
