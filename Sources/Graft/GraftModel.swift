import Foundation
import GraftIO
import GraftModels
import GraftTensor
import GraftText

/// A pretrained model with its tokenizer, loaded from a transformers directory (BERT: `config.json` +
/// `model.safetensors` + `vocab.txt`) or a GGUF file (Llama), detected from what `path` holds.
public final class GraftModel: @unchecked Sendable {
    /// The model families Graft runs.
    public enum Architecture: String, Sendable {
        /// A BERT encoder (e.g. all-MiniLM-L6-v2).
        case bert
        /// A Llama decoder (e.g. SmolLM2).
        case llama
    }

    /// Where the model was loaded from.
    public let path: String
    /// The model family.
    public let architecture: Architecture
    /// The root of the module tree (Hugging Face names below it).
    public let root: Module
    /// The tokenizer that came with the model.
    public let tokenizer: any Tokenizer
    /// The encoder, when `architecture == .bert`.
    public let bert: BertModel?
    /// The decoder, when `architecture == .llama`.
    public let llama: LlamaModel?

    /// Loads the model at `path`, detecting its format.
    public init(path: String) throws {
        RoutingMethods.register()
        self.path = path
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw GraftError(.notFound, "\(path): no such file or directory")
        }
        if isDirectory.boolValue {
            let config = path + "/config.json"
            guard FileManager.default.fileExists(atPath: config) else {
                throw GraftError(.notFound, "\(path): not a model directory (no config.json); expected a transformers BERT directory or a .gguf file")
            }
            let c = try JSONConfig(contentsOf: config)
            let type = try c.string("model_type") ?? "?"
            guard type == "bert" else {
                throw GraftError(.unsupported, "\(config): model_type '\(type)' is not supported in a directory (supported: bert; Llama loads from GGUF)")
            }
            let model = try BertModel(directory: path)
            let vocab = path + "/vocab.txt"
            tokenizer = try WordPieceTokenizer(vocabFile: vocab)
            architecture = .bert
            bert = model
            llama = nil
            root = model
        } else {
            let gguf = try GGUFFile(contentsOf: path)
            let model = try LlamaModel(gguf: gguf)
            tokenizer = try BPETokenizer(gguf: gguf.metadata)
            architecture = .llama
            llama = model
            bert = nil
            root = model
        }
    }

    /// Token ids for `text` (with the model's special tokens for BERT: `[CLS] … [SEP]`).
    public func encode(_ text: String) -> [Int32] {
        tokenizer.encode(text, addSpecialTokens: architecture == .bert)
    }

    /// Text for `ids`, skipping special tokens.
    public func decode(_ ids: [Int32]) -> String {
        tokenizer.decode(ids, skipSpecialTokens: true)
    }

    /// The last hidden state (BERT) or the logits (Llama) for a batch, `[batch, length, width]`.
    public func forward(_ batch: TokenBatch) throws -> Tensor {
        if let bert { return try bert.forward(batch) }
        if let llama { return try llama.logits(batch) }
        throw GraftError(.internalError, "model has no architecture")
    }

    /// Generates a continuation of `prompt` (Llama only); `onToken` streams each new token's text.
    public func generate(
        prompt: String, parameters: GenerationParameters = GenerationParameters(),
        onText: (String) -> Bool = { _ in true }
    ) throws -> String {
        guard let llama else {
            throw GraftError(.unsupported, "\(path): generation needs a decoder model; this is a \(architecture.rawValue) encoder")
        }
        var params = parameters
        if params.stopTokens.isEmpty {
            for t in ["<|im_end|>", "<|endoftext|>"] { if let id = tokenizer.id(of: t) { params.stopTokens.insert(id) } }
            if let eos = tokenizer.eosTokenId { params.stopTokens.insert(eos) }
        }
        var emitted: [Int32] = []
        var printed = ""
        let ids = try llama.generate(prompt: tokenizer.encode(prompt, addSpecialTokens: false), parameters: params) { id in
            if params.stopTokens.contains(id) { return true }
            emitted.append(id)
            let text = tokenizer.decode(emitted, skipSpecialTokens: true)
            // Emit only complete characters: hold back while the tail is an incomplete UTF-8 sequence.
            if text.hasPrefix(printed), !text.hasSuffix("\u{FFFD}") {
                let delta = String(text.dropFirst(printed.count))
                printed = text
                return onText(delta)
            }
            return true
        }
        return tokenizer.decode(ids.filter { !params.stopTokens.contains($0) }, skipSpecialTokens: true)
    }
}
