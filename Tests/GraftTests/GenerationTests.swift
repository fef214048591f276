import Foundation
import Testing
@testable import Graft
import GraftModels
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

    /// A batch of prompts: each prompt is prefilled in a step of its own, as it is alone (a GEMM may round a row
    /// differently beside other rows), then every decoding step runs all the sequences together; each sequence gets
    /// the tokens its prompt gets alone.
    @Test func batchedGenerationPrefillsEachPromptInAStepOfItsOwn() throws {
        let session = try GraftSession(path: try Assets.require(Assets.smollm2), task: .causalLM)
        let llama = try session.taskModel.decoder()
        let prompts = ["The quick brown fox", "1, 2, 3,", "Once upon a time, in a land far away,"].map {
            session.model.tokenizer.encode($0)
        }
        let parameters = GenerationParameters(maxNewTokens: 6, stopTokens: [])
        var steps: [[Int]] = []
        let batched = try llama.generate(prompts: prompts, parameters: parameters, around: { rows, step in
            steps.append(rows)
            return try step()
        })
        #expect(steps == [[0], [1], [2]] + Array(repeating: [0, 1, 2], count: 5), "steps \(steps)")
        for (i, prompt) in prompts.enumerated() {
            let alone = try llama.generate(prompts: [prompt], parameters: parameters)
            #expect(alone == [batched[i]], "prompt \(i)")
        }
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
