import Foundation
import Graft

/// Generation: tokens streamed as they are sampled, then the whole result.
extension Engine {
    /// Generates after the request's prompt (text, optionally in the chat template, or token ids), streaming
    /// each token as a non-final response, then answering with all of them.
    func generate(_ r: Graft_V1_Generate, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        guard r.promptIds.isEmpty || r.prompt.isEmpty else {
            throw GraftError.invalid("generate: give prompt_ids or prompt, not both")
        }
        let prompt: [Int32]
        if r.promptIds.isEmpty {
            guard !r.prompt.isEmpty else { throw GraftError.invalid("generate: the prompt is empty") }
            prompt = s.model.encode(r.chat ? try s.chatPrompt(r.prompt) : r.prompt)
        } else {
            prompt = r.promptIds
        }
        let options = try Self.samplingOptions(r)
        let ids = try s.generate(prompt: prompt, parameters: options.generationParameters(stopTokens: []),
                                 stopAtEOS: options.stopAtEOS) { id, piece in
            reply(context, final: false) { $0.token = .with { $0.tokenID = id; $0.text = piece } }
            return true
        }
        let text = s.model.decode(ids)
        reply(context) { $0.generated = .with { $0.ids = ids; $0.text = text } }
    }
}
