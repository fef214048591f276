// The C ABI's chat template (include/graft.h, "Generation"): the model's ChatTemplate, the same one `graft generate`
// applies unless --raw and graftd applies for a Generate request with `chat` set (GraftSession.chatPrompt).
import Foundation
import Graft

/// The C entry point `graft_chat_template_apply`; its contract (arguments, errors, ownership, threads) is in
/// include/graft.h.
@_cdecl("graft_chat_template_apply")
public func graft_chat_template_apply(_ model: OpaquePointer?, _ userMessage: UnsafePointer<CChar>?,
                                      _ prompt: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    guarded {
        let s = try session(model)
        let message = try string(userMessage, "user_message")
        guard let prompt else { throw GraftError.invalid("prompt is NULL") }
        prompt.pointee = try mallocString(try s.chatPrompt(message))
    }
}
