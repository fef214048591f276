import Foundation
import GraftIO
import GraftModels
import GraftRouting
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

    /// The network that was loaded, by family.
    public enum Backbone {
        /// A BERT encoder.
        case encoder(BertModel)
        /// A Llama decoder.
        case decoder(LlamaModel)
    }

    /// Where the model was loaded from.
    public let path: String
    /// The network.
    public let backbone: Backbone
    /// The tokenizer that came with the model.
    public let tokenizer: any Tokenizer

    /// Loads the model at `path`, detecting its format.
    public init(path: String) throws {
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
            backbone = .encoder(try BertModel(directory: path))
            tokenizer = try WordPieceTokenizer(vocabFile: path + "/vocab.txt")
        } else {
            let gguf = try GGUFFile(contentsOf: path)
            backbone = .decoder(try LlamaModel(gguf: gguf))
            tokenizer = try BPETokenizer(gguf: gguf.metadata)
        }
    }

    /// The model family.
    public var architecture: Architecture {
        switch backbone {
        case .encoder: return .bert
        case .decoder: return .llama
        }
    }

    /// The root of the module tree (Hugging Face names below it).
    public var root: Module {
        switch backbone {
        case .encoder(let bert): return bert
        case .decoder(let llama): return llama
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
        switch backbone {
        case .encoder(let bert): return try bert.forward(batch)
        case .decoder(let llama): return try llama.logits(batch)
        }
    }
}

extension GraftModel {
    /// Makes the Llama decoder the MoE base `directory` holds (a `graft moefy --output` directory); `option` names
    /// the setting in errors ("moe_base", "--moe-base"). UNSUPPORTED for a model that is not a Llama decoder,
    /// NOT_FOUND when `directory` has no `moe_config.json`, FORMAT (naming file and field) when it does not fit.
    public func loadMoEBase(_ directory: String, option: String = "moe_base") throws {
        guard case .decoder(let llama) = backbone else {
            throw GraftError(.unsupported, "\(option) '\(directory)': an MoE base is made from a Llama decoder, but \(path) is a \(architecture.rawValue) model")
        }
        guard FileManager.default.fileExists(atPath: directory + "/" + MoEBaseFormat.configName) else {
            throw GraftError(.notFound, "\(option) '\(directory)': no \(MoEBaseFormat.configName) there (make one with graft moefy --output)")
        }
        try MoEBaseFormat.load(into: llama, from: directory)
    }
}
