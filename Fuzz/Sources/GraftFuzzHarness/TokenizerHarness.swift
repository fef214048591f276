import GraftTensor
import GraftText

extension FuzzHarness {
    /// MiniLM's WordPiece tokenizer (`all-MiniLM-L6-v2/vocab.txt`) and SmolLM2's byte-level BPE tokenizer (from
    /// the GGUF's metadata), loaded once from the asset cache. A missing asset stops the run with a message.
    static let tokenizers: (wordPiece: WordPieceTokenizer, bpe: BPETokenizer) = {
        do {
            let wordPiece = try WordPieceTokenizer(vocabFile: assetHome + "/all-MiniLM-L6-v2/vocab.txt")
            let bpe = try BPETokenizer(ggufFile: assetHome + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            return (wordPiece, bpe)
        } catch {
            fatalError("the tokenizer target needs the model assets (run scripts/fetch-assets): \(error)")
        }
    }()

    /// The first byte picks the tokenizer (bit 0: WordPiece or BPE) and the operation (bit 1: encode the rest
    /// as text, or decode the rest as little-endian 32-bit token ids); bit 2 toggles special tokens. Text is
    /// decoded from the bytes as UTF-8 with replacement, as every door does with user text.
    public static func tokenizer(_ data: UnsafeRawBufferPointer) {
        guard let first = data.first else { return }
        let rest = UnsafeRawBufferPointer(rebasing: data[1...])
        let tokenizer: any Tokenizer = first & 1 == 0 ? tokenizers.wordPiece : tokenizers.bpe
        let special = first & 4 != 0
        if first & 2 == 0 {
            let text = String(decoding: rest, as: UTF8.self)
            let ids = tokenizer.encode(text, addSpecialTokens: special)
            for id in ids where id < 0 || Int(id) >= tokenizer.vocabularySize {
                fatalError("tokenizer: encode produced id \(id) outside 0..<\(tokenizer.vocabularySize)")
            }
            _ = tokenizer.decode(ids, skipSpecialTokens: !special)
        } else {
            var ids: [Int32] = []
            ids.reserveCapacity(rest.count / 4)
            var i = 0
            while i + 4 <= rest.count {
                ids.append(Int32(littleEndian: rest.loadUnaligned(fromByteOffset: i, as: Int32.self)))
                i += 4
            }
            _ = tokenizer.decode(ids, skipSpecialTokens: special)
            for id in ids.prefix(16) { _ = tokenizer.token(of: id) }
        }
    }
}
