import Foundation
import Testing
import Graft
import GraftTestSupport

/// Mixture-of-Recursions made from SmolLM2 (frozen): a shared block recursed once or twice per token, a router
/// trained on tweets picking each token's depth. Reports the average recursion depth and held-out perplexity
/// against the dense model and both fixed depths.
@Suite struct MixtureOfRecursionsSmolLM2Tests {
    @Test func aRoutedSharedBlockLandsBetweenItsFixedDepthsAtAStatedPerplexity() throws {
        try run(block: 12..<15, suffixStart: 18, penalty: 0.3, label: "block 12-14 shared for 12-17")
    }

    /// Layer 5 recursed once more for the tokens the router picks (depth 1 is the dense model).
    @Test func anExtraRecursionOfOneLayerForRoutedTokens() throws {
        try run(block: 5..<6, suffixStart: 6, penalty: 0, label: "layer 5 recursed")
    }

    /// The shared block of the first test with a LoRA per recursion (rank 8 on o_proj and down_proj): the LoRAs
    /// are first trained with every token at depth 2 (the block's second run standing in for layers 15–17), then
    /// the router, starting from depth 2 for every token, with a compute penalty.
    @Test func recursionLoRAsMakeTheSecondRecursionPay() throws {
        try run(block: 12..<15, suffixStart: 18, penalty: 0.5, label: "block 12-14 shared for 12-17, recursion LoRA r=8",
                loraSteps: 6, firstDepthBias: -2)
    }

    func run(block: Range<Int>, suffixStart: Int, penalty: Float, label: String, loraSteps: Int = 0,
             firstDepthBias: Float = 0) throws {
        let text = try SmolLM2TweetText()
        let llama = text.model, heldOut = text.heldOut
        func perplexity() throws -> Double { try text.heldOutPerplexity() }
        let dense = try perplexity()
        let routing = try MixtureOfRecursions(model: llama, blockStart: block.lowerBound, blockEnd: block.upperBound,
                                              suffixStart: suffixStart, maxRecursions: 2,
                                              firstDepthBias: firstDepthBias, seed: 1)
        llama.depthPolicy = routing
        routing.forcedDepth = 1
        let shallow = try perplexity()
        routing.forcedDepth = 2
        let deep = try perplexity()
        routing.forcedDepth = nil

        func batch(_ step: Int, rows: Int) throws -> (TokenBatch, [Int32]) { try text.batch(step: step, rows: rows) }
        var adaptedDeep = Double.nan
        if loraSteps > 0 {
            try routing.addRecursionLoRA(model: llama, rank: 8, alpha: 16, seed: 2)
            let loras = routing.recursionAdapters.flatMap { $0.loraA + $0.loraB }.map { $0.requiringGrad() }
            let loraOptimizer = AdamW(parameters: loras, learningRate: 2e-3, weightDecay: 0)
            routing.forcedDepth = 2
            var trace: [String] = []
            for step in 0..<loraSteps {
                let (b, targets) = try batch(1000 + step, rows: 4)
                loraOptimizer.zeroGrad()
                let (loss, _) = try routing.trainingLoss(model: llama, batch: b, targets: targets, computePenalty: 0)
                loss.backward()
                loraOptimizer.step()
                #expect(loss.item.isFinite)
                if step % 3 == 0 || step == loraSteps - 1 { trace.append(String(format: "%d: %.3f", step, loss.item)) }
            }
            print("MoR SmolLM2 recursion-LoRA training at depth 2 (loss): \(trace.joined(separator: ", "))")
            adaptedDeep = try perplexity()
            routing.forcedDepth = nil
            for t in loras { t.requiringGrad(false) }
        }

        routing.trainsRouter = true
        let optimizer = AdamW(parameters: [routing.routerWeight.requiringGrad(), routing.routerBias.requiringGrad()],
                              learningRate: 1e-3, weightDecay: 0)
        let steps = 6, rows = 4
        var trace: [String] = []
        for step in 0..<steps {
            let (batch, targets) = try batch(step, rows: rows)
            optimizer.zeroGrad()
            let (loss, depth) = try routing.trainingLoss(model: llama, batch: batch, targets: targets, computePenalty: penalty)
            loss.backward()
            optimizer.step()
            #expect(loss.item.isFinite, "step \(step): objective \(loss.item)")
            if step % 3 == 0 || step == steps - 1 { trace.append(String(format: "%d: %.3f/%.2f", step, loss.item, depth)) }
        }
        print("MoR SmolLM2 training (objective / mean recursion depth): \(trace.joined(separator: ", "))")
        routing.trainsRouter = false
        routing.resetStatistics()
        let routed = try perplexity()
        let depth = routing.statistics.meanDepth
        let layers = Double(routing.layersRun(depth: 0, layerCount: 30)) + depth * Double(block.count)
        print(String(format: "SmolLM2 MoR (%@, N=2, penalty %.1f): mean recursion depth %.3f (%.2f layers per token), held-out perplexity %.2f; depth 1 everywhere (%d layers) %.2f, depth 2 everywhere (%d layers) %.2f, dense %.2f on %d tweets",
                     label as NSString, penalty, depth, layers, routed, routing.layersRun(depth: 1, layerCount: 30), shallow,
                     routing.layersRun(depth: 2, layerCount: 30), deep, dense, heldOut.count) + ", depth histogram \(routing.statistics.dispatchedTokens)"
              + (loraSteps > 0 ? String(format: "; depth 2 everywhere with the recursion LoRAs %.2f", adaptedDeep) : ""))
        #expect([dense, shallow, deep, routed].allSatisfy { $0.isFinite })
        #expect(routing.statistics.tokens == heldOut.reduce(0) { $0 + $1.count })
        #expect(depth >= 1 && depth <= 2)
    }
}
