import Foundation
import Testing
import Graft
import GraftTestSupport

/// Dr.LLM routers trained on SmolLM2 (frozen) over tweets, every 10th held out: the average depth (layers run per
/// token) and the held-out perplexity at that depth against the dense model's. Short runs (a straight-through step
/// runs every layer up to three ways): the quality at longer training is `bench/moe` row 6's.
@Suite struct DrLLMSmolLM2Tests {
    @Test func routersTrainedWithAComputePenaltyRunFewerLayersAtAStatedPerplexity() throws {
        let text = try SmolLM2TweetText()
        let llama = text.model, heldOut = text.heldOut
        /// Held-out perplexity, one tweet per pass (each takes its own route).
        func perplexity() throws -> Double { try text.heldOutPerplexity() }
        let dense = try perplexity()

        let routing = try DrLLMRouting(model: llama, bottleneck: 32, windows: 8, executeBias: 2, seed: 1)
        llama.depthPolicy = routing
        routing.mode = .straightThrough
        let params = routing.namedParameters().map { $0.tensor.requiringGrad() }
        let optimizer = AdamW(parameters: params, learningRate: 3e-3, weightDecay: 0)
        let steps = 8, rows = 4, penalty: Float = 1.5
        var trace: [String] = []
        for step in 0..<steps {
            let (batch, targets) = try text.batch(step: step, rows: rows)
            optimizer.zeroGrad()
            let (loss, runs) = try routing.trainingLoss(model: llama, batch: batch, targets: targets, computePenalty: penalty)
            loss.backward()
            optimizer.step()
            #expect(loss.item.isFinite, "step \(step): objective \(loss.item)")
            if step % 2 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f/%.1f", step, loss.item, runs)) }
        }
        print("Dr.LLM SmolLM2 training (objective / layer runs per sequence): \(trace.joined(separator: ", "))")

        routing.mode = .hard
        routing.resetStatistics()
        let routed = try perplexity()
        let depth = routing.meanDepth
        let actions = routing.statistics.map { s in ["S", "E", "T"].enumerated().filter { s.dispatchedTokens[$0.offset] > 0 }.map(\.element).joined() }
        print(String(format: "SmolLM2 Dr.LLM (penalty %.1f, %d steps of %d tweets): average depth %.2f of 30 layers per token, held-out perplexity %.2f vs dense %.2f on %d tweets",
                     penalty, steps, rows, depth, routed, dense, heldOut.count))
        print("per-layer actions taken (S skip, E execute, T twice): \(actions.joined(separator: " "))")
        #expect(dense.isFinite && routed.isFinite)
        #expect(routing.statistics.allSatisfy { $0.tokens == heldOut.reduce(0) { $0 + $1.count } })
        #expect(depth > 0 && depth <= 60)
    }
    /// The paper's training: routes searched per training tweet (greedy, 0.03 nats per layer run), routers taught
    /// them by class-weighted cross-entropy. Eight tweets: each search runs about 65 partial forward passes.
    @Test func routersTaughtSearchedRoutesRunFewerLayersAtAStatedPerplexity() throws {
        let text = try SmolLM2TweetText()
        let llama = text.model, heldOut = text.heldOut, training = Array(text.training.prefix(8))
        func perplexity() throws -> Double { try text.heldOutPerplexity() }
        let dense = try perplexity()
        let routing = try DrLLMRouting(model: llama, bottleneck: 32, windows: 8, executeBias: 0, seed: 1)
        llama.depthPolicy = routing
        var examples: [(inputs: [Tensor], route: [DrLLMAction])] = []
        var searchedRuns = 0.0, searchedLoss = 0.0, denseLoss = 0.0
        for ids in training {
            let found = try DrLLMRouteSearch.search(model: llama, ids: ids, layerCost: 0.03, maxTrials: 4)
            searchedRuns += Double(found.runs) / Double(training.count)
            searchedLoss += found.loss / Double(training.count)
            denseLoss += found.denseLoss / Double(training.count)
            examples.append((try DrLLMRouteSearch.layerInputs(model: llama, routing: routing, ids: ids, route: found.route), found.route))
        }
        let weights = DrLLMRouteSearch.classWeights(examples.map(\.route))
        print(String(format: "SmolLM2 Dr.LLM route search on %d tweets: %.2f layer runs per tweet, mean loss %.3f vs dense %.3f",
                     training.count, searchedRuns, searchedLoss, denseLoss) + "; class weights \(weights)")
        #expect(searchedLoss + 0.03 * searchedRuns <= denseLoss + 0.03 * 30 + 1e-9)
        let optimizer = AdamW(parameters: routing.namedParameters().map { $0.tensor.requiringGrad() }, learningRate: 1e-2, weightDecay: 0)
        var first = Float.nan, last = Float.nan
        for step in 0..<60 {
            optimizer.zeroGrad()
            let loss = try DrLLMRouteSearch.supervisedLoss(routing: routing, examples: examples, classWeights: weights)
            loss.backward()
            optimizer.step()
            if step == 0 { first = loss.item }
            last = loss.item
        }
        routing.resetStatistics()
        let routed = try perplexity()
        let actions = routing.statistics.map { s in ["S", "E", "T"].enumerated().filter { s.dispatchedTokens[$0.offset] > 0 }.map(\.element).joined() }
        print(String(format: "SmolLM2 Dr.LLM (searched routes, supervised routers, loss %.3f -> %.3f): average depth %.2f of 30 layers per token, held-out perplexity %.2f vs dense %.2f on %d tweets",
                     first, last, routing.meanDepth, routed, dense, heldOut.count))
        print("per-layer actions taken (S skip, E execute, T twice): \(actions.joined(separator: " "))")
        #expect(last < first && dense.isFinite && routed.isFinite)
        #expect(routing.meanDepth > 0 && routing.meanDepth <= 60)
    }
}
