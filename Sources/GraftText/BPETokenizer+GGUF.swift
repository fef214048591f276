import GraftIO
import GraftTensor

extension BPETokenizer {
    /// Builds the tokenizer from GGUF metadata (`GGUFFile.metadata`).
    ///
    /// Reads `tokenizer.ggml.model` (must be `"gpt2"`), `tokenizer.ggml.tokens`, `tokenizer.ggml.merges`,
    /// `tokenizer.ggml.token_type` (optional), `tokenizer.ggml.pre` (see `PreTokenizer.init(ggufPre:)`;
    /// missing means `"gpt-2"`), the optional ids `tokenizer.ggml.bos_token_id`, `eos_token_id`,
    /// `unknown_token_id`, `padding_token_id`, and the optional flags `tokenizer.ggml.add_bos_token` /
    /// `add_eos_token` (default false).
    /// - Throws: `GraftError(.notFound)` for a missing required key, `.format` for a key of the wrong type
    ///   or value (naming key and value), `.unsupported` for an unknown model or pre-tokenizer.
    public convenience init(gguf metadata: [String: GGUFValue]) throws {
        func value(_ key: String) throws -> GGUFValue {
            guard let v = metadata[key] else {
                throw GraftError(.notFound, "GGUF metadata has no \(key)")
            }
            return v
        }
        func optionalId(_ key: String) throws -> Int32? {
            guard let v = metadata[key] else { return nil }
            guard let i = v.int, let id = Int32(exactly: i) else {
                throw GraftError.format("GGUF \(key) = \(v) is not a token id")
            }
            return id
        }
        func optionalBool(_ key: String) throws -> Bool {
            guard let v = metadata[key] else { return false }
            guard let b = v.bool else { throw GraftError.format("GGUF \(key) = \(v) is not a bool") }
            return b
        }
        let modelValue = try value("tokenizer.ggml.model")
        guard let model = modelValue.string else {
            throw GraftError.format("GGUF tokenizer.ggml.model = \(modelValue) is not a string")
        }
        guard model == "gpt2" else {
            throw GraftError(.unsupported,
                             "GGUF tokenizer.ggml.model = \"\(model)\" is not supported (only \"gpt2\" byte-level BPE)")
        }
        guard let tokens = try value("tokenizer.ggml.tokens").stringArray else {
            throw GraftError.format("GGUF tokenizer.ggml.tokens is not an array of strings")
        }
        guard let merges = try value("tokenizer.ggml.merges").stringArray else {
            throw GraftError.format("GGUF tokenizer.ggml.merges is not an array of strings")
        }
        var types: [Int32]?
        if let v = metadata["tokenizer.ggml.token_type"] {
            guard let ints = v.intArray else {
                throw GraftError.format("GGUF tokenizer.ggml.token_type is not an array of integers")
            }
            var out: [Int32] = []
            out.reserveCapacity(ints.count)
            for (i, t) in ints.enumerated() {
                guard let t32 = Int32(exactly: t) else {
                    throw GraftError.format("GGUF tokenizer.ggml.token_type[\(i)] = \(t) is out of range")
                }
                out.append(t32)
            }
            types = out
        }
        var pre = PreTokenizer.gpt2
        if let v = metadata["tokenizer.ggml.pre"] {
            guard let name = v.string else {
                throw GraftError.format("GGUF tokenizer.ggml.pre = \(v) is not a string")
            }
            pre = try PreTokenizer(ggufPre: name)
        }
        do {
            try self.init(
                tokens: tokens, merges: merges, tokenTypes: types,
                bosId: try optionalId("tokenizer.ggml.bos_token_id"),
                eosId: try optionalId("tokenizer.ggml.eos_token_id"),
                unkId: try optionalId("tokenizer.ggml.unknown_token_id"),
                padId: try optionalId("tokenizer.ggml.padding_token_id"),
                preTokenizer: pre,
                addBosToken: try optionalBool("tokenizer.ggml.add_bos_token"),
                addEosToken: try optionalBool("tokenizer.ggml.add_eos_token"))
        } catch let error as GraftError {
            throw GraftError(error.code, "GGUF tokenizer metadata: \(error.message)")
        }
    }

    /// Reads the tokenizer from a GGUF file's metadata (tensor data is not touched).
    /// - Throws: whatever `GGUFFile(contentsOf:)` throws for the file, then as `init(gguf:)`, with the path
    ///   prefixed to the message.
    public convenience init(ggufFile path: String) throws {
        let file = try GGUFFile(contentsOf: path)
        do {
            try self.init(gguf: file.metadata)
        } catch let error as GraftError {
            throw GraftError(error.code, "\(path): \(error.message)")
        }
    }
}
