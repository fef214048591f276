import Foundation
import GraftIO
import GraftTensor

/// The hyper-parameters of a BERT encoder, as in transformers' `BertConfig`.
public struct BertConfig: Sendable, Equatable {
    public var vocabSize: Int
    public var hiddenSize: Int
    public var layers: Int
    public var heads: Int
    public var intermediateSize: Int
    public var maxPositions: Int
    public var typeVocabSize: Int
    public var layerNormEps: Float
    public var padTokenId: Int32

    /// Reads a transformers `config.json`; only `hidden_act: gelu` and absolute positions are supported.
    public init(contentsOf path: String) throws {
        let c = try JSONConfig(contentsOf: path)
        if let act = try c.string("hidden_act"), act != "gelu" {
            throw GraftError(.unsupported, "\(path): hidden_act '\(act)' is not supported (only 'gelu')")
        }
        if let pos = try c.string("position_embedding_type"), pos != "absolute" {
            throw GraftError(.unsupported, "\(path): position_embedding_type '\(pos)' is not supported (only 'absolute')")
        }
        vocabSize = try c.int("vocab_size")
        hiddenSize = try c.int("hidden_size")
        layers = try c.int("num_hidden_layers")
        heads = try c.int("num_attention_heads")
        intermediateSize = try c.int("intermediate_size")
        maxPositions = try c.int("max_position_embeddings", default: 512)
        typeVocabSize = try c.int("type_vocab_size", default: 2)
        layerNormEps = Float(try c.double("layer_norm_eps", default: 1e-12))
        padTokenId = Int32(clamping: try c.int("pad_token_id", default: 0))
        for (field, value) in [("vocab_size", vocabSize), ("hidden_size", hiddenSize), ("num_hidden_layers", layers),
                               ("num_attention_heads", heads), ("intermediate_size", intermediateSize),
                               ("max_position_embeddings", maxPositions), ("type_vocab_size", typeVocabSize)]
        where value <= 0 || value > 1 << 24 {
            throw GraftError.format("\(path): '\(field)' must be a positive size, got \(value)")
        }
        guard heads > 0, hiddenSize % heads == 0 else {
            throw GraftError.format("\(path): hidden_size \(hiddenSize) is not divisible by num_attention_heads \(heads)")
        }
    }
}

/// One `BertLayer`: self-attention, its output projection + LayerNorm, the feed-forward block + LayerNorm.
public final class BertLayer: Module, LayerAdapterHost {
    public let query: Linear, key: Linear, value: Linear
    public let attentionOutput: Linear, attentionNorm: LayerNorm
    public let intermediate: Linear, output: Linear, outputNorm: LayerNorm
    let heads: Int
    /// Modules inserted after the attention / feed-forward sublayers or on the layer output (bottleneck adapters,
    /// ReFT); none by default.
    public var layerAdapters: [any LayerAdapter] = []
    /// Width of the residual stream.
    public var hiddenSize: Int { attentionOutput.outFeatures }

    init(prefix: String, weights: (String) throws -> Tensor, config: BertConfig) throws {
        func lin(_ name: String) throws -> Linear {
            Linear(weight: try weights("\(prefix).\(name).weight"), bias: try weights("\(prefix).\(name).bias"))
        }
        func norm(_ name: String) throws -> LayerNorm {
            LayerNorm(weight: try weights("\(prefix).\(name).weight"), bias: try weights("\(prefix).\(name).bias"),
                      eps: config.layerNormEps)
        }
        query = try lin("attention.self.query")
        key = try lin("attention.self.key")
        value = try lin("attention.self.value")
        attentionOutput = try lin("attention.output.dense")
        attentionNorm = try norm("attention.output.LayerNorm")
        intermediate = try lin("intermediate.dense")
        output = try lin("output.dense")
        outputNorm = try norm("output.LayerNorm")
        heads = config.heads
        super.init(typeName: "BertLayer")
        register("attention", ModuleList(typeName: "BertAttention", [
            ("self", ModuleList(typeName: "BertSelfAttention", [("query", query), ("key", key), ("value", value)])),
            ("output", ModuleList(typeName: "BertSelfOutput", [("dense", attentionOutput), ("LayerNorm", attentionNorm)])),
        ]))
        register("intermediate", ModuleList(typeName: "BertIntermediate", [("dense", intermediate)]))
        register("output", ModuleList(typeName: "BertOutput", [("dense", output), ("LayerNorm", outputNorm)]))
    }

    /// `x`: `[batch, length, hidden]`; `prefix` (prefix tuning) is prepended to the keys and values.
    func forward(_ x: Tensor, mask: AttentionMask, prefix: (keys: Tensor, values: Tensor)? = nil) -> Tensor {
        let q = query.forward(x)
        var k = key.forward(x), v = value.forward(x)
        if let prefix {
            let rows = x.shape[0], n = prefix.keys.shape[0], width = prefix.keys.shape[1]
            k = concat([concat([Tensor](repeating: prefix.keys.reshaped([1, n, width]), count: rows), dim: 0), k], dim: 1)
            v = concat([concat([Tensor](repeating: prefix.values.reshaped([1, n, width]), count: rows), dim: 0), v], dim: 1)
        }
        let context = scaledDotProductAttention(query: q, key: k, value: v, heads: heads, kvHeads: heads, mask: mask)
        let attended = applyLayerAdapters(layerAdapters, site: .attention, output: attentionOutput.forward(context), input: x, mask: mask)
        let h = attentionNorm.forward(attended + x)
        let ff = applyLayerAdapters(layerAdapters, site: .feedForward, output: output.forward(gelu(intermediate.forward(h))), input: h, mask: mask)
        return applyLayerAdapters(layerAdapters, site: .output, output: outputNorm.forward(ff + h), input: x, mask: mask)
    }
}

/// A BERT encoder with Hugging Face parameter names (`embeddings.*`, `encoder.layer.N.*`, `pooler.dense`).
public final class BertModel: Module, PrefixHost, ForwardHookHost {
    /// Hooks run before every forward pass (X-LoRA's scaling pass).
    public var forwardHooks: [any ForwardPassHook] = []
    /// TR-PTS's token reduction, applied by ``BertForSequenceClassification`` when enabled; nil by default.
    public var tokenReduction: TokenReduction?
    public let config: BertConfig
    public let wordEmbeddings: Embedding, positionEmbeddings: Embedding, tokenTypeEmbeddings: Embedding
    public let embeddingNorm: LayerNorm
    public internal(set) var layers: [BertLayer]
    /// The layers as loaded (``layers`` differs after ``replicateLayers(_:)``).
    public internal(set) var originalLayers: [BertLayer] = []
    /// The `[start, end)` ranges ``layers`` was stacked from (PEFT's `layer_replication`); nil for the original.
    public internal(set) var layerReplication: [[Int]]?
    /// The pooler's dense layer (`pooler.dense`), applied with tanh to the first token.
    public let pooler: Linear?

    /// Builds the encoder from a tensor source keyed by Hugging Face names.
    public init(config: BertConfig, weights: (String) throws -> Tensor, hasPooler: Bool) throws {
        self.config = config
        func expect(_ name: String, _ shape: [Int]) throws -> Tensor {
            let t = try weights(name)
            guard t.shape == shape else {
                throw GraftError.format("tensor '\(name)' has shape \(t.shape), config expects \(shape)")
            }
            return t
        }
        let h = config.hiddenSize
        wordEmbeddings = Embedding(weight: try expect("embeddings.word_embeddings.weight", [config.vocabSize, h]))
        positionEmbeddings = Embedding(weight: try expect("embeddings.position_embeddings.weight", [config.maxPositions, h]))
        tokenTypeEmbeddings = Embedding(weight: try expect("embeddings.token_type_embeddings.weight", [config.typeVocabSize, h]))
        embeddingNorm = LayerNorm(weight: try expect("embeddings.LayerNorm.weight", [h]),
                                  bias: try expect("embeddings.LayerNorm.bias", [h]), eps: config.layerNormEps)
        var layers: [BertLayer] = []
        for i in 0..<config.layers {
            let layer = try BertLayer(prefix: "encoder.layer.\(i)", weights: weights, config: config)
            guard layer.query.weight.shape == [h, h], layer.intermediate.weight.shape == [config.intermediateSize, h] else {
                throw GraftError.format("encoder.layer.\(i): weight shapes do not match hidden_size \(h) / intermediate_size \(config.intermediateSize)")
            }
            layers.append(layer)
        }
        self.layers = layers
        originalLayers = layers
        pooler = hasPooler
            ? Linear(weight: try expect("pooler.dense.weight", [h, h]), bias: try expect("pooler.dense.bias", [h]))
            : nil
        super.init(typeName: "BertModel")
        register("embeddings", ModuleList(typeName: "BertEmbeddings", [
            ("word_embeddings", wordEmbeddings), ("position_embeddings", positionEmbeddings),
            ("token_type_embeddings", tokenTypeEmbeddings), ("LayerNorm", embeddingNorm),
        ]))
        register("encoder", ModuleList(typeName: "BertEncoder", [("layer", ModuleList.numbered(layers))]))
        if let pooler { register("pooler", ModuleList(typeName: "BertPooler", [("dense", pooler)])) }
    }

    /// Loads a transformers BERT directory (`config.json` + `model.safetensors`).
    public convenience init(directory: String) throws {
        let config = try BertConfig(contentsOf: directory + "/config.json")
        let file = try SafeTensorsFile(contentsOf: directory + "/model.safetensors")
        // Checkpoints saved from BertFor* heads prefix names with "bert.".
        let prefix = file.contains("bert.embeddings.word_embeddings.weight") ? "bert." : ""
        try self.init(config: config, weights: { try file.tensor(prefix + $0) },
                      hasPooler: file.contains(prefix + "pooler.dense.weight"))
    }

    /// The last hidden state, `[batch, length, hidden]`. Padding positions are computed (as transformers does)
    /// but never attended to.
    /// Prompt adapters; the first enabled one prepends its virtual tokens to every row.
    public var promptAdapters: [any PromptAdapter] = []
    /// The hidden size (virtual tokens enter as input embeddings).
    public var embeddingWidth: Int { config.hiddenSize }
    /// Attention layers (prefix tuning).
    public var prefixLayerCount: Int { layers.count }
    /// Width of one layer's prefix keys: the hidden size.
    public var prefixWidth: Int { config.hiddenSize }
    /// Prefix adapters; the first enabled one prepends keys and values in every layer.
    public var prefixAdapters: [any PrefixAdapter] = []

    /// The last hidden state, `[batch, virtual + length, hidden]` with prompt tuning (virtual tokens first, at
    /// positions `0..<virtual`, as PEFT runs BertModel on `inputs_embeds`).
    public func forward(_ batch: TokenBatch) throws -> Tensor {
        try batch.validate(vocabularySize: config.vocabSize)
        try runForwardHooks(batch, cache: nil)
        if let prompt = promptAdapters.first(where: { $0.isEnabled }) {
            return try forwardWithPrompt(batch, prompts: prompt.virtualTokens(rows: batch.batchSize))
        }
        let prefix = prefixAdapters.first(where: { $0.isEnabled })
        // With a prefix, transformers counts positions after the cached (virtual) tokens.
        var x = try embed(batch, offset: Int32(prefix?.prefix(layer: 0).keys.shape[0] ?? 0))
        if let prefix {
            guard batch.segments == nil else {
                throw GraftError(.unsupported, "prefix tuning with packed sequences is not supported; pad the batch instead")
            }
            for (i, layer) in layers.enumerated() {
                let p = prefix.prefix(layer: i)
                let mask = AttentionMask(keyLengths: batch.lengths.map { $0 + p.keys.shape[0] })
                x = layer.forward(x, mask: mask, prefix: p)
            }
            return x
        }
        let mask = AttentionMask(keyLengths: batch.lengths, segments: batch.segments)
        for layer in layers { x = layer.forward(x, mask: mask) }
        return x
    }

    /// The embedded tokens `[batch, length, hidden]`, positions shifted past `offset` prefix tokens.
    func embed(_ batch: TokenBatch, offset: Int32 = 0) throws -> Tensor {
        let positions = batch.resolvedPositions
        if let bad = positions.first(where: { $0 < 0 || Int($0) >= config.maxPositions }) {
            throw GraftError.invalid("position \(bad) is outside 0..<\(config.maxPositions) (sequence too long for this model)")
        }
        let types = batch.tokenTypes ?? [Int32](repeating: 0, count: batch.ids.count)
        if let bad = types.first(where: { $0 < 0 || Int($0) >= config.typeVocabSize }) {
            throw GraftError.invalid("token type \(bad) is outside 0..<\(config.typeVocabSize)")
        }
        let shape = [batch.batchSize, batch.length, config.hiddenSize]
        let shifted = offset == 0 ? positions : positions.map { $0 + offset }
        if let bad = shifted.first(where: { Int($0) >= config.maxPositions }) {
            throw GraftError.invalid("position \(bad) (after \(offset) prefix tokens) is outside 0..<\(config.maxPositions)")
        }
        let summed = wordEmbeddings.forward(batch.ids) + positionEmbeddings.forward(shifted) + tokenTypeEmbeddings.forward(types)
        return embeddingNorm.forward(summed).reshaped(shape)
    }

    /// The encoder's output (transformers' `hidden_states[-1]`); BERT keeps no cache.
    public func lastHiddenStates(_ batch: TokenBatch, cache: KVCache?) throws -> Tensor { try forward(batch) }

    private func forwardWithPrompt(_ batch: TokenBatch, prompts: Tensor) throws -> Tensor {
        guard batch.segments == nil else {
            throw GraftError(.unsupported, "prompt tuning with packed sequences is not supported; pad the batch instead")
        }
        let virtual = prompts.shape[1], total = virtual + batch.length
        guard total <= config.maxPositions else {
            throw GraftError.invalid("\(virtual) virtual + \(batch.length) tokens exceed the model's \(config.maxPositions) positions")
        }
        let rows = batch.batchSize, h = config.hiddenSize
        let words = wordEmbeddings.forward(batch.ids).reshaped([rows, batch.length, h])
        let inputs = concat([prompts, words], dim: 1).reshaped([rows * total, h])
        let positions = (0..<rows).flatMap { _ in (0..<total).map(Int32.init) }
        let types = [Int32](repeating: 0, count: rows * total)
        let summed = inputs + positionEmbeddings.forward(positions) + tokenTypeEmbeddings.forward(types)
        var x = embeddingNorm.forward(summed).reshaped([rows, total, h])
        let mask = AttentionMask(keyLengths: batch.lengths.map { $0 + virtual })
        for layer in layers { x = layer.forward(x, mask: mask) }
        return x
    }

    /// `tanh(dense(h))` of each sequence's first token, the pooled output BertForSequenceClassification
    /// classifies. `tokens` are flat indices into `[batch * length]` (the first token of each packed sequence);
    /// nil means position 0 of every row.
    public func pool(_ hidden: Tensor, tokens: [Int32]? = nil) throws -> Tensor {
        guard let pooler else { throw GraftError(.unsupported, "this checkpoint has no pooler (pooler.dense)") }
        let rowsN = hidden.shape[0], length = hidden.shape[1], width = hidden.shape[2]
        let picks = tokens ?? (0..<rowsN).map { Int32($0 * length) }
        if let bad = picks.first(where: { $0 < 0 || Int($0) >= rowsN * length }) {
            throw GraftError.invalid("pooling token index \(bad) is outside the batch's \(rowsN * length) tokens")
        }
        let first = embedding(picks, table: hidden.reshaped([rowsN * length, width]))
        return tanh(pooler.forward(first))
    }
}
