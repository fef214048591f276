import Foundation
import Testing
import Graft
import GraftTestSupport

/// KV-cached generation on every MoE base design and MoE tuning adapter, on the tiny random Llamas the routing suites
/// use: MoEfication at top-2 of 4, upcycling with perturbed expert copies, HMoE (heterogeneous experts, top-p),
/// ReXMoE (expert reuse, window 1), cross-layer shared experts (expert reuse, window nil), and ESFT and PERFT
/// adapters with nonzero weights on an MoE base. For each, greedy generation with the KV cache (``LlamaModel/
/// generate(prompt:parameters:onToken:)``) picks the same tokens as greedy argmax over uncached full passes, and at
/// every step (the prompt's last position, then each decoded token) the cached logits agree with the full pass over
/// the same prefix within 1e-4 of the largest logit (the two differ only by float32 summation order: a 1-row
/// decoding product against a T-row one; measured up to 4.5e-6 here, and a cache bug moves logits by 1e-1 or more). Every logit must be finite. Each design must also change the logits of the
/// model it was built from (by > 1e-3), so the check runs through routing that matters.
@Suite struct MoEGenerationCacheTests {
    enum Design: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case moefication, upcycling, hmoe, rexmoe, sharedExperts, esft, perft
        var testDescription: String { rawValue }
    }

    /// Largest cached-vs-uncached logit difference at a step, relative to the largest |logit| of the uncached pass.
    static let tolerance: Float = 1e-4
    static let prompt: [Int32] = [4, 8, 15, 16, 23, 9]
    static let newTokens = 8
    static var probeBatch: TokenBatch { get throws { try TokenBatch(sequences: [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]) } }

    /// A design's model, the adapted model that holds its adapter (kept alive for the test), and the logits of the
    /// model it was built from on ``probeBatch`` (dense for the MoE bases, the MoE base for reuse and adapters).
    struct Built {
        let model: LlamaModel
        let adapted: AdaptedModel?
        let before: Tensor
    }

    static func logits(_ model: LlamaModel) throws -> Tensor { try withNoGrad { try model.logits(try probeBatch) } }

    static func perturb(_ tensors: [Tensor], std: Float, seed: UInt64) {
        var rng = GraftRNG(seed: seed)
        for t in tensors { for i in 0..<t.count { t.pointer[i] += std * rng.nextNormal() } }
    }

    static func build(_ design: Design) throws -> Built {
        switch design {
        case .moefication:
            let model = try tinyRandomLlama(layers: 3, seed: 21, std: 0.5)
            let before = try logits(model)
            try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1),
                                  options: MoEficationTests.options(experts: 4, topK: 2))
            return Built(model: model, adapted: nil, before: before)
        case .upcycling:
            let model = try MoEficationTests.tinyLlama()
            let before = try logits(model)
            let blocks = try MoEUpcycling.apply(to: model, options: MoEUpcyclingTests.options(experts: 4, topK: 2))
            // Exact copies would make the routing irrelevant (the renormalized gates sum to 1 over equal outputs).
            perturb(blocks.flatMap { [$0.gateWeight, $0.upWeight, $0.downWeight] }, std: 0.2, seed: 17)
            return Built(model: model, adapted: nil, before: before)
        case .hmoe:
            let model = try MoEficationTests.tinyLlama()
            let before = try logits(model)
            try MoEfication.apply(to: model, sequences: MoEficationTests.sequences(12, length: 20, seed: 1), options: HMoETests.options(topK: 2))
            // HMoE routes by top-p: a token takes as many experts as it needs to reach p.
            for b in model.moeBlocks { b.topP = 0.6 }
            return Built(model: model, adapted: nil, before: before)
        case .rexmoe, .sharedExperts:
            let model = try ExpertReuseTests.moeLlama()
            let before = try logits(model)
            var options = ExpertReuseOptions()
            options.window = design == .rexmoe ? 1 : nil
            try ExpertReuse.apply(to: model, options: options)
            return Built(model: model, adapted: nil, before: before)
        case .esft:
            let model = try ESFTTests.moeBase()
            let before = try logits(model)
            let adapted = AdaptedModel(root: model, methods: .all)
            let adapter = try adapted.addAdapter("esft", config: ESFTTests.config(["0": [1, 3], "1": [2]]))
            let layers = adapter.modules.compactMap { $0.adapter as? ESFTLayer }
            #expect(layers.count == 2)
            perturb(layers.flatMap { [$0.tuned.gate, $0.tuned.up, $0.tuned.down] }, std: 0.2, seed: 5)
            return Built(model: model, adapted: adapted, before: before)
        case .perft:
            let model = try ESFTTests.moeBase()
            let before = try logits(model)
            let adapted = AdaptedModel(root: model, methods: .all)
            let adapter = try adapted.addAdapter("perft", config: PERFTTests.config(), seed: 3)
            let layers = adapter.modules.compactMap { $0.adapter as? PERFTLayer }
            #expect(layers.count == 2)
            // B starts at zero (the adapter is then the base): give it weights so the routed LoRA experts add output.
            perturb(layers.map(\.loraB), std: 0.5, seed: 6)
            return Built(model: model, adapted: adapted, before: before)
        }
    }

    /// max |a − b| / max |b| over one row of logits; NaN when either holds a NaN.
    static func relativeDeviation(_ a: [Float], _ b: [Float]) -> Float {
        let scale = worstOf(b.map(abs), empty: .nan)
        return worstOf(zip(a, b).map { abs($0 - $1) }, empty: .nan) / Swift.max(scale, 1e-6)
    }

    /// Along `continuation` (teacher-forced), the worst relative deviation between each cached step's last-position
    /// logits (prompt prefill, then one token at a time) and an uncached full pass over the same prefix, and whether
    /// every logit of both was finite. One step per continuation token: the step that predicts it.
    static func stepDeviations(_ model: LlamaModel, prompt: [Int32], continuation: [Int32]) throws -> (worst: Float, finite: Bool) {
        let v = model.config.vocabSize
        let cache = KVCache(layerCount: model.layers.count)
        var sequence = prompt, input = prompt
        var worst: Float = 0, finite = true
        for next in continuation {
            let cached = try withNoGrad {
                try model.lmHead.forward(model.hiddenStates(TokenBatch(ids: input, batchSize: 1, length: input.count), cache: cache))
            }
            let full = try withNoGrad { try model.logits(TokenBatch(ids: sequence, batchSize: 1, length: sequence.count)) }
            finite = finite && cached.scalars.allSatisfy(\.isFinite) && full.scalars.allSatisfy(\.isFinite)
            worst = worse(worst, relativeDeviation(Array(cached.scalars.suffix(v)), Array(full.scalars.suffix(v))))
            sequence.append(next)
            input = [next]
        }
        return (worst, finite)
    }

    @Test(arguments: Design.allCases)
    func cachedGreedyGenerationMatchesUncachedFullPasses(_ design: Design) throws {
        let clock = ContinuousClock(), start = clock.now
        let built = try Self.build(design)
        let model = built.model
        #expect(model.moeBlocks.count >= 2 && model.moeBlocks.allSatisfy { $0.topK < $0.experts || $0.topP != nil },
                "\(design): sparse routing in every MoE block")
        let after = try Self.logits(model)
        let change = maxAbsDifference(after, built.before)
        #expect(change > 1e-3, "\(design) leaves the logits of the model it was built from within \(change)")
        #expect(after.scalars.allSatisfy { $0.isFinite }, "\(design): non-finite logits")

        model.resetMoERouterStatistics()
        built.adapted?.resetRouterStatistics()
        let parameters = GenerationParameters(maxNewTokens: Self.newTokens, temperature: 0, stopTokens: [])
        let cached = try model.generate(prompt: Self.prompt, parameters: parameters)
        let uncached = try uncachedGreedy(model, prompt: Self.prompt, steps: Self.newTokens)
        // The routing is not degenerate: in every MoE layer generation dispatched tokens to at least two experts.
        for s in model.moeRouterStatistics {
            let used = s.dispatchedTokens.filter { $0 > 0 }.count, dispatched = s.dispatchedTokens
            #expect(used >= 2, "\(design) \(s.path): dispatched \(dispatched)")
        }
        if design == .rexmoe || design == .sharedExperts {
            #expect(ExpertReuse.borrowedShare(of: model) > 0, "\(design): generation never took a borrowed expert")
        }
        if let adapted = built.adapted, design == .perft {
            #expect(adapted.routerStatistics().allSatisfy { $0.stats.tokens > 0 }, "PERFT routers saw the generated tokens")
        }
        let (worst, finite) = try Self.stepDeviations(model, prompt: Self.prompt, continuation: cached)
        let elapsed = (clock.now - start).components
        let ms = Double(elapsed.seconds) * 1e3 + Double(elapsed.attoseconds) / 1e15
        print(String(format: "MoE cached generation, %@: cached %@, uncached %@, worst relative step-logit deviation %.3e over %d steps (%.0f ms)",
                     design.rawValue, "\(cached)", "\(uncached)", worst, cached.count, ms))
        #expect(cached.count == Self.newTokens && cached.allSatisfy { (0..<32).contains($0) })
        #expect(cached == uncached, "\(design): cached \(cached), uncached \(uncached)")
        #expect(finite, "\(design): a non-finite logit during generation")
        #expect(worst <= Self.tolerance, "\(design): cached step logits differ from full passes by \(worst) (relative)")
    }
}
