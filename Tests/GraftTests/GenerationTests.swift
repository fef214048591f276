import Foundation
import Testing
@testable import Graft
import GraftTestSupport

@Suite(.serialized) struct GenerationTests {
    /// The model's own chat template (recognised from its vocabulary) around a question; greedy decoding answers it.
    @Test func smolLM2GreedyAnswerNamesParis() throws {
        let session = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        let prompt = try session.chatPrompt("What is the capital of France?")
        #expect(prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
        let ids = try session.generate(prompt: session.model.tokenizer.encode(prompt, addSpecialTokens: false),
                                       parameters: GenerationParameters(maxNewTokens: 24), stopAtEOS: true) { _, _ in true }
        let answer = session.model.decode(ids)
        print("SmolLM2 greedy answer: \(answer)")
        #expect(answer.contains("Paris"))
    }

    /// An encoder has no chat template and cannot generate; both say so.
    @Test func anEncoderHasNoChatTemplate() throws {
        let session = try GraftSession(path: try Assets.require(Assets.minilm), task: .base)
        #expect(throws: GraftError.self) { try session.chatPrompt("hi") }
        #expect(throws: GraftError.self) {
            try session.generate(prompt: [101], parameters: GenerationParameters(), stopAtEOS: true) { _, _ in true }
        }
        // Nor does the MiniLM vocabulary hold ChatML markers.
        #expect(throws: GraftError.self) { try ChatTemplate(tokenizer: session.model.tokenizer, source: "minilm") }
    }
}
