import GraftText

/// Turns generated tokens into text pieces holding whole characters only: a token that ends inside a UTF-8
/// sequence yields "" and a later one the rest.
struct TextStream {
    let tokenizer: any Tokenizer
    private var emitted: [Int32] = []
    private var printed = ""

    init(tokenizer: any Tokenizer) { self.tokenizer = tokenizer }

    /// The text `token` completes.
    mutating func piece(after token: Int32) -> String {
        emitted.append(token)
        let text = tokenizer.decode(emitted, skipSpecialTokens: false)
        guard text.hasPrefix(printed), !text.hasSuffix("\u{FFFD}") else { return "" }
        let piece = String(text.dropFirst(printed.count))
        printed = text
        return piece
    }
}
