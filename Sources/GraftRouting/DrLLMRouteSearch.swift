import Foundation
import GraftModels
import GraftTensor

/// Dr.LLM's supervised training, after the paper: a search finds, per training sequence, a route that keeps or
/// lowers its loss under a compute cost; those routes label each layer's action, and the routers learn the labels
/// by class-weighted cross-entropy, the base frozen.
///
/// The paper searches with a length-aware Monte Carlo tree search; Graft searches greedily instead: it scores every
/// single edit of the all-execute route (skip or twice at one layer, from the cached inputs of that layer), then
/// applies the best-scoring edits one at a time, keeping each that lowers `loss + layerCost · runs`. Class weights
/// (inverse action frequency) take the place of the paper's focal loss for the execute-heavy labels. The search
/// runs the bare layer stack (no adapters' hooks).
public enum DrLLMRouteSearch {
    /// A searched route and what it scores.
    public struct Result: Sendable {
        /// The route, one action per layer.
        public var route: [DrLLMAction]
        /// Mean next-token loss (nats) of the sequence under the route.
        public var loss: Double
        /// The same under the all-execute route (the dense model).
        public var denseLoss: Double
        /// Forward passes spent (partial stacks counted as one).
        public var evaluations: Int
        /// Layer runs of the route.
        public var runs: Int { route.reduce(0) { $0 + $1.rawValue } }
    }

    /// Searches a route for `ids` (at least 2 tokens) through `model`'s layers: objective mean loss plus
    /// `layerCost` nats per layer run; at most `maxTrials` combined edits are tried after the single ones.
    public static func search(model: LlamaModel, ids: [Int32], layerCost: Double, maxTrials: Int = 8) throws -> Result {
        guard ids.count >= 2 else { throw GraftError.invalid("Dr.LLM route search: a sequence needs at least 2 tokens, got \(ids.count)") }
        let batch = try TokenBatch(ids: ids, batchSize: 1, length: ids.count)
        try batch.validate(vocabularySize: model.config.vocabSize)
        return withNoGrad {
            let layers = model.layers, count = layers.count, t = ids.count
            let positions = (0..<t).map(Int32.init)
            let mask = AttentionMask(causal: true)
            var inputs: [Tensor] = []
            var h = model.embedTokens.forward(ids).reshaped([1, t, model.config.hiddenSize])
            for layer in layers {
                inputs.append(h)
                h = layer.run(h, positions: positions, mask: mask, cache: nil)
            }
            var evaluations = 1
            func loss(_ x: Tensor) -> Double {
                let logits = model.lmHead.forward(model.norm.forward(x).reshaped([t, model.config.hiddenSize]))
                return Double(crossEntropy(logits, targets: Array(ids.dropFirst()) + [-100]).item)
            }
            /// The loss of `route`, whose layers before `start` all execute.
            func loss(_ route: [DrLLMAction], from start: Int) -> Double {
                evaluations += 1
                var x = inputs[start]
                for i in start..<count {
                    for _ in 0..<route[i].rawValue { x = layers[i].run(x, positions: positions, mask: mask, cache: nil) }
                }
                return loss(x)
            }
            let dense = loss(h)
            let execute = [DrLLMAction](repeating: .execute, count: count)
            func objective(_ l: Double, _ route: [DrLLMAction]) -> Double {
                l + layerCost * Double(route.reduce(0) { $0 + $1.rawValue })
            }
            var edits: [(layer: Int, action: DrLLMAction, score: Double)] = []
            for i in 0..<count {
                for action in [DrLLMAction.skip, .twice] {
                    var route = execute
                    route[i] = action
                    let score = objective(loss(route, from: i), route)
                    if score.isFinite { edits.append((i, action, score)) }
                }
            }
            edits.sort { $0.score < $1.score }
            var best = execute, bestLoss = dense, bestScore = objective(dense, execute)
            for edit in edits.prefix(max(maxTrials, 0)) where edit.score < objective(dense, execute) {
                var route = best
                route[edit.layer] = edit.action
                let start = route.firstIndex { $0 != .execute } ?? edit.layer
                let l = loss(route, from: start)
                if objective(l, route) < bestScore { best = route; bestLoss = l; bestScore = objective(l, route) }
            }
            return Result(route: best, loss: bestLoss, denseLoss: dense, evaluations: evaluations)
        }
    }

    /// Per layer, the input `[1, length, hidden]` of `ids` when `routing` (``LlamaModel/depthPolicy`` of `model`)
    /// forces `route`: what the router of that layer reads on the route it is taught. Not recorded for autograd.
    public static func layerInputs(model: LlamaModel, routing: DrLLMRouting, ids: [Int32],
                                   route: [DrLLMAction]) throws -> [Tensor] {
        guard model.depthPolicy === routing else { throw GraftError(.state, "Dr.LLM: the routing is not the model's depth policy") }
        let (savedRoute, savedMode, savedStatistics) = (routing.forcedRoute, routing.mode, routing.statistics)
        defer {
            routing.forcedRoute = savedRoute
            routing.mode = savedMode
            routing.capturesInputs = false
            for (r, s) in zip(routing.routers, savedStatistics) { r.statistics = s }
        }
        routing.forcedRoute = route
        routing.mode = .hard
        routing.capturesInputs = true
        _ = try withNoGrad { try model.hiddenStates(TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
        return routing.capturedInputs
    }

    /// Inverse-frequency weights of the three actions over `routes` (`N / (3 · count)`, 0 for an absent action).
    public static func classWeights(_ routes: [[DrLLMAction]]) -> [Float] {
        var counts = [Int](repeating: 0, count: 3)
        for route in routes { for a in route { counts[a.rawValue] += 1 } }
        let total = counts.reduce(0, +)
        return counts.map { $0 > 0 ? Float(total) / Float(3 * $0) : 0 }
    }

    /// The routers' class-weighted cross-entropy against searched routes, averaged over layers: `examples` pair
    /// each sequence's ``layerInputs(model:routing:ids:route:)`` with its route. Recorded for autograd.
    public static func supervisedLoss(routing: DrLLMRouting, examples: [(inputs: [Tensor], route: [DrLLMAction])],
                                      classWeights: [Float]) throws -> Tensor {
        let layers = routing.routers.count
        guard !examples.isEmpty, classWeights.count == 3,
              examples.allSatisfy({ $0.inputs.count == layers && $0.route.count == layers }) else {
            throw GraftError.invalid("Dr.LLM: supervised examples need \(layers) layer inputs and actions each, and 3 class weights")
        }
        var total: Tensor?
        for (i, router) in routing.routers.enumerated() {
            let logits = concat(examples.map { router.logits($0.inputs[i], lengths: [$0.inputs[i].shape[1]], windows: routing.windows) }, dim: 0)
            var weights = [Float](repeating: 0, count: examples.count * 3)
            for (e, example) in examples.enumerated() {
                let label = example.route[i].rawValue
                weights[e * 3 + label] = classWeights[label]
            }
            let norm = weights.reduce(0, +)
            guard norm > 0 else { continue }
            let term = sum(logSoftmax(logits) * Tensor(shape: [examples.count, 3], values: weights.map { -$0 / norm }))
            total = total.map { $0 + term } ?? term
        }
        return (total ?? Tensor(scalar: 0)) * (1 / Float(layers))
    }
}
