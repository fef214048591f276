import Testing
@testable import GraftModels
import GraftTensor

@Suite struct SamplerTests {
    let logits: [Float] = [2.0, 1.0, 0.5, -1.0, 3.0]

    func draw(_ params: GenerationParameters, times: Int = 200) -> [Int32] {
        var sampler = TokenSampler(parameters: params)
        return logits.withUnsafeBufferPointer { buf in (0..<times).map { _ in sampler.sample(buf) } }
    }

    @Test func greedyPicksTheArgmax() {
        #expect(Set(draw(GenerationParameters(temperature: 0))) == [4])
    }

    @Test func samplingIsReproducibleFromTheSeed() {
        let p = GenerationParameters(temperature: 1, seed: 7)
        #expect(draw(p) == draw(p))
        #expect(draw(p) != draw(GenerationParameters(temperature: 1, seed: 8)))
        #expect(Set(draw(p, times: 2000)).count == 5, "temperature 1 reaches every token")
    }

    @Test func topPKeepsTheSmallestSetReachingP() {
        // softmax(logits): token 4 ≈ 0.61, token 0 ≈ 0.22, token 1 ≈ 0.08 ...
        #expect(Set(draw(GenerationParameters(temperature: 1, topP: 0.5, seed: 1), times: 500)) == [4])
        #expect(Set(draw(GenerationParameters(temperature: 1, topP: 0.8, seed: 1), times: 2000)) == [4, 0])
        #expect(Set(draw(GenerationParameters(temperature: 1, topK: 2, seed: 1), times: 2000)) == [4, 0])
    }

    @Test func invalidParametersAreRejected() {
        #expect(throws: GraftError.self) { try GenerationParameters(temperature: -1).validate() }
        #expect(throws: GraftError.self) { try GenerationParameters(topP: 0).validate() }
        #expect(throws: GraftError.self) { try GenerationParameters(maxNewTokens: -2).validate() }
    }
}
