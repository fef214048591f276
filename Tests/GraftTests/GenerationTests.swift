import Foundation
import Testing
@testable import Graft
import GraftTestSupport

@Suite(.serialized) struct GenerationTests {
    @Test func smolLM2GreedyAnswerNamesParis() throws {
        let path = try Assets.require(Assets.smollm2)
        let model = try GraftModel(path: path)
        let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        let answer = try model.generate(prompt: prompt, parameters: GenerationParameters(maxNewTokens: 24))
        print("SmolLM2 greedy answer: \(answer)")
        #expect(answer.contains("Paris"))
    }

}
