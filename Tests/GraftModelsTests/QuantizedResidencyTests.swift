import Testing
@testable import GraftModels
import GraftIO
import GraftTensor
import GraftTestSupport
import GraftText

/// SmolLM2 loaded with its GGUF weights left in their block formats (the default) computes what the model
/// dequantized to float32 at load computes: the same embedding rows bit for bit, the same logits and input
/// gradients up to summation order; turning the tied table dense keeps the head tied.
@Suite(.serialized) struct QuantizedResidencyTests {
    @Test func blockFormatWeightsMatchTheDequantizedModel() throws {
        let path = try Assets.require(Assets.smollm2)
        let compact = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let dense = try LlamaModel(gguf: GGUFFile(contentsOf: path), keepQuantized: false)
        let layers = compact.namedModules().compactMap { $0.module as? Linear }
        #expect(layers.count == 30 * 7 + 1 && layers.allSatisfy { $0.compactWeight != nil })
        #expect(compact.embedTokens.compactWeight != nil && compact.lmHead.compactWeight === compact.embedTokens.compactWeight)
        #expect(dense.namedModules().allSatisfy { ($0.module as? Linear)?.compactWeight == nil })
        #expect(compact.parameterCount == dense.parameterCount)
        #expect(compact.namedParameterShapes().map(\.name).sorted() == dense.namedParameterShapes().map(\.name).sorted())
        let resident = layers.compactMap { $0.compactWeight?.residentBytes }.reduce(0, +)
        print("SmolLM2 compact weights: \(resident) bytes resident for \(compact.parameterCount) parameters")

        let ids: [Int32] = [1, 504, 3458, 282, 4649, 314, 30, 9, 42, 17]
        #expect(maxAbsDifference(compact.embedTokens.forward(ids), dense.embedTokens.forward(ids)) == 0)
        let batch = try TokenBatch(ids: ids + ids.reversed(), batchSize: 2, length: ids.count)
        let a = try withNoGrad { try compact.logits(batch) }, b = try withNoGrad { try dense.logits(batch) }
        let err = maxAbsDifference(a, b)
        print("SmolLM2 logits, block-format vs float32 weights: max-abs \(err)")
        #expect(err <= 1e-3)

        // The input gradient through every frozen quantized layer (what LoRA training below them needs).
        func inputGradient(_ model: LlamaModel) throws -> Tensor {
            let layer = model.layers[0]
            var rng = GraftRNG(seed: 4)
            let x = Tensor.randomNormal([1, 6, model.config.hiddenSize], rng: &rng).requiringGrad()
            let positions = (0..<6).map(Int32.init)
            let y = layer.forward(x, positions: positions, mask: AttentionMask(causal: true, keyLengths: nil, segments: nil, queryOffset: 0), cache: nil)
            sum(mul(y, y)).backward()
            return try #require(x.grad)
        }
        let reference = try inputGradient(dense)
        let gradError = maxAbsDifference(try inputGradient(compact), reference)
        let scale = worstOf((0..<reference.count).map { abs(reference.pointer[$0]) }, empty: 0)
        print("SmolLM2 layer 0 input gradient, block-format vs float32 weights: max-abs \(gradError) (gradients up to \(scale))")
        #expect(scale > 0 && gradError <= 1e-5 * scale)

        compact.embedTokens.makeWeightDense()
        #expect(compact.embedTokens.compactWeight == nil && compact.lmHead.compactWeight == nil)
        #expect(compact.lmHead.weight === compact.embedTokens.weight)
        let c = try withNoGrad { try compact.logits(batch) }
        #expect(maxAbsDifference(c, b) <= 1e-3)
    }

    /// The fast mode (int8 activations against the Q4_1 / Q8_0 blocks while decoding) against the exact mode on a
    /// real prompt: the logits of every decoding step stay close (the bound is reported), and greedy tokens are
    /// compared (agreement reported; a single late flip is how quantized decoding diverges, not a failure).
    @Test func fastDecodeStaysCloseToTheExactMode() throws {
        let path = try Assets.require(Assets.smollm2)
        let model = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let tokenizer = try BPETokenizer(ggufFile: path)
        let prompt = tokenizer.encode("The capital of France is Paris. The capital of Germany is", addSpecialTokens: false)
        #expect(prompt.count > 5)

        // Teacher-forced: both modes decode the same tokens one at a time with their own KV caches.
        let steps = 24
        let exact = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: steps))
        var worst: Float = 0, scale: Float = 0
        func lastLogits(_ batch: TokenBatch, cache: KVCache) throws -> Tensor {
            let hidden = try model.hiddenStates(batch, cache: cache)
            let last = hidden.slice(dim: 1, (batch.length - 1)..<batch.length).reshaped([1, model.config.hiddenSize])
            return model.lmHead.forward(last)
        }
        try withNoGrad {
            let caches = (KVCache(layerCount: model.layers.count), KVCache(layerCount: model.layers.count))
            var input = prompt
            for step in 0..<steps {
                let batch = try TokenBatch(ids: input, batchSize: 1, length: input.count)
                let a = try lastLogits(batch, cache: caches.0)
                let b = try withInt8Activations { try lastLogits(batch, cache: caches.1) }
                #expect((0..<b.count).allSatisfy { b.pointer[$0].isFinite }, "step \(step): non-finite fast logits")
                worst = max(worst, maxAbsDifference(a, b))
                scale = max(scale, worstOf((0..<a.count).map { abs(a.pointer[$0]) }, empty: 0))
                input = [exact[step]]
            }
        }
        print("SmolLM2 fast decode (int8 activations) vs exact: max-abs logit deviation \(worst) over \(steps) steps (logits up to \(scale))")
        #expect(worst > 0 && worst <= 0.05 * scale)

        let fast = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: steps, fastDecode: true))
        let agree = zip(exact, fast).prefix { $0 == $1 }.count
        print("SmolLM2 greedy tokens, fast vs exact: first \(agree) of \(steps) agree; exact \(exact), fast \(fast)")
        #expect(fast.count == steps && agree >= 4)
    }

    /// The causal-LM loss through SmolLM2's tied Q8_0 head decoded tile by tile (what training uses) against the
    /// same loss through the head dequantized at load: equal loss and input gradient up to summation order, with
    /// the batch's real hidden states and next-token targets.
    @Test func compactHeadLossMatchesTheDequantizedHead() throws {
        let path = try Assets.require(Assets.smollm2)
        let compact = try LlamaModel(gguf: GGUFFile(contentsOf: path))
        let dense = try LlamaModel(gguf: GGUFFile(contentsOf: path), keepQuantized: false)
        let head = try #require(compact.lmHead.compactWeight)
        let ids: [Int32] = [1, 504, 3458, 282, 4649, 314, 30, 9, 42, 17, 2016, 7, 288, 1450]
        let batch = try TokenBatch(ids: ids, batchSize: 1, length: ids.count)
        let states = try withNoGrad { try compact.hiddenStates(batch) }.reshaped([ids.count, compact.config.hiddenSize])
        let targets = Array(ids.dropFirst()) + [-100]
        func lossAndGradient(_ loss: (Tensor) -> Tensor) throws -> (Float, Tensor) {
            let x = states.copy().requiringGrad()
            let l = loss(x)
            l.backward()
            return (l.item, try #require(x.grad))
        }
        let (compactLoss, compactGrad) = try lossAndGradient { linearCrossEntropy($0, frozen: head, targets: targets, chunkRows: 5) }
        let (denseLoss, denseGrad) = try lossAndGradient { linearCrossEntropy($0, weight: dense.lmHead.weight, targets: targets, chunkRows: 5) }
        let scale = worstOf((0..<denseGrad.count).map { abs(denseGrad.pointer[$0]) }, empty: 0)
        let gradError = maxAbsDifference(compactGrad, denseGrad)
        print("SmolLM2 LM-head loss, tiles of the Q8_0 head vs the dequantized head: \(compactLoss) vs \(denseLoss), " +
              "input gradient max-abs \(gradError) (gradients up to \(scale))")
        #expect(compactLoss.isFinite && abs(compactLoss - denseLoss) <= 1e-5 * abs(denseLoss))
        #expect(scale > 0 && gradError <= 1e-5 * scale)
    }
}
