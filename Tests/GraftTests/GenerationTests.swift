import Foundation
import Testing
@testable import Graft

@Suite(.serialized) struct GenerationTests {
    @Test func smolLM2GreedyAnswerNamesParis() throws {
        guard let path = Assets.require(Assets.smollm2) else { return }
        let model = try GraftModel(path: path)
        let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        let answer = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 24))
        print("SmolLM2 greedy answer: \(answer)")
        #expect(answer.contains("Paris"))
    }

}
