import GraftIO
import GraftTensor

/// The hyper-parameters of a Llama decoder, as in transformers' `LlamaConfig`.
public struct LlamaConfig: Sendable, Equatable {
    public var vocabSize: Int
    public var hiddenSize: Int
    public var layers: Int
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int
    public var intermediateSize: Int
    public var rmsNormEps: Float
    public var ropeBase: Float
    public var contextLength: Int

    /// A config from its hyper-parameters (synthetic models in tests); `heads` must divide `hiddenSize` and be a
    /// multiple of `kvHeads`, with `headDim` = `hiddenSize / heads`.
    public init(vocabSize: Int, hiddenSize: Int, layers: Int, heads: Int, kvHeads: Int, headDim: Int,
                intermediateSize: Int, rmsNormEps: Float, ropeBase: Float, contextLength: Int) {
        self.vocabSize = vocabSize
        self.hiddenSize = hiddenSize
        self.layers = layers
        self.heads = heads
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.intermediateSize = intermediateSize
        self.rmsNormEps = rmsNormEps
        self.ropeBase = ropeBase
        self.contextLength = contextLength
    }

    /// Reads the `llama.*` metadata of a GGUF file.
    public init(gguf: GGUFFile) throws {
        func int(_ key: String) throws -> Int {
            guard let v = gguf.int(key) else { throw GraftError.format("\(gguf.path): metadata '\(key)' is missing or not an integer") }
            return v
        }
        guard let arch = gguf.string("general.architecture") else {
            throw GraftError.format("\(gguf.path): metadata 'general.architecture' is missing")
        }
        guard arch == "llama" else {
            throw GraftError(.unsupported, "\(gguf.path): architecture '\(arch)' is not supported (only 'llama')")
        }
        hiddenSize = try int("llama.embedding_length")
        layers = try int("llama.block_count")
        heads = try int("llama.attention.head_count")
        kvHeads = gguf.int("llama.attention.head_count_kv") ?? heads
        intermediateSize = try int("llama.feed_forward_length")
        contextLength = gguf.int("llama.context_length") ?? 2048
        rmsNormEps = gguf.float("llama.attention.layer_norm_rms_epsilon") ?? 1e-5
        ropeBase = gguf.float("llama.rope.freq_base") ?? 10000
        for (key, value) in [("llama.embedding_length", hiddenSize), ("llama.block_count", layers),
                             ("llama.attention.head_count", heads), ("llama.attention.head_count_kv", kvHeads),
                             ("llama.feed_forward_length", intermediateSize), ("llama.context_length", contextLength)]
        where value <= 0 || value > 1 << 24 {
            throw GraftError.format("\(gguf.path): metadata '\(key)' must be a positive size, got \(value)")
        }
        guard heads > 0, kvHeads > 0, hiddenSize % heads == 0, heads % kvHeads == 0 else {
            throw GraftError.format("\(gguf.path): head counts \(heads)/\(kvHeads) do not divide embedding_length \(hiddenSize)")
        }
        headDim = hiddenSize / heads
        guard let embd = gguf.tensorInfo("token_embd.weight"), embd.shape.count == 2, embd.shape[1] == hiddenSize else {
            throw GraftError.format("\(gguf.path): tensor 'token_embd.weight' is missing or not [vocab, \(hiddenSize)]")
        }
        vocabSize = embd.shape[0]
    }
}

/// One `LlamaDecoderLayer`: RMSNorm, grouped-query self-attention with RoPE, RMSNorm, SwiGLU MLP.
public final class LlamaDecoderLayer: Module, LayerAdapterHost {
    public let inputNorm: RMSNorm, postAttentionNorm: RMSNorm
    /// The attention block (`self_attn`).
    public let selfAttn: LlamaAttention
    public let gateProj: Linear, upProj: Linear, downProj: Linear
    let config: LlamaConfig
    /// Modules inserted after the attention / MLP sublayers or on the layer output (bottleneck adapters, ReFT);
    /// none by default.
    public var layerAdapters: [any LayerAdapter] = []
    /// Runs instead of the dense `mlp` block when set (an MoE feed-forward block made from it); nil by default.
    public var feedForwardOverride: (any FeedForwardBlock)?
    /// Width of the residual stream.
    public var hiddenSize: Int { selfAttn.oProj.outFeatures }
    /// `self_attn.q_proj`.
    public var qProj: Linear { selfAttn.qProj }
    /// `self_attn.k_proj`.
    public var kProj: Linear { selfAttn.kProj }
    /// `self_attn.v_proj`.
    public var vProj: Linear { selfAttn.vProj }
    /// `self_attn.o_proj`.
    public var oProj: Linear { selfAttn.oProj }

    init(inputNorm: RMSNorm, attention: LlamaAttention, postNorm: RMSNorm, gate: Linear, up: Linear, down: Linear,
         config: LlamaConfig) {
        self.inputNorm = inputNorm
        self.postAttentionNorm = postNorm
        selfAttn = attention
        gateProj = gate; upProj = up; downProj = down
        self.config = config
        super.init(typeName: "LlamaDecoderLayer")
        register("self_attn", attention)
        register("mlp", ModuleList(typeName: "LlamaMLP", [("gate_proj", gate), ("up_proj", up), ("down_proj", down)]))
        register("input_layernorm", inputNorm)
        register("post_attention_layernorm", postNorm)
    }

    /// `x`: `[batch, length, hidden]`; `cache` (when generating) holds this layer's earlier keys and values.
    /// With `rowCaches` (one cache per batch row, batched generation) only the first `rowLengths[r]` positions
    /// of row `r` are real; each row attends to its own cache and its real positions.
    /// `prefix`: keys and values `[n, kvHeads · headDim]` every row attends to before its own (prefix tuning).
    func forward(_ x: Tensor, positions: [Int32], mask: AttentionMask, cache: KVCache.Layer?,
                 rowCaches: [KVCache.Layer]? = nil, rowLengths: [Int]? = nil,
                 prefix: (keys: Tensor, values: Tensor)? = nil) -> Tensor {
        let h = inputNorm.forward(x)
        let attention = selfAttn.forward(h, positions: positions, mask: mask, cache: cache, rowCaches: rowCaches,
                                         rowLengths: rowLengths, prefix: prefix)
        let x1 = x + applyLayerAdapters(layerAdapters, site: .attention, output: attention, input: h, mask: mask)
        let h2 = postAttentionNorm.forward(x1)
        let mlp = feedForwardOverride?.forward(h2) ?? {
            let gateAndUp = Linear.forward(h2, sharedBy: [gateProj, upProj])
            return downProj.forward(swiglu(gateAndUp[0], gateAndUp[1]))
        }()
        let out = x1 + applyLayerAdapters(layerAdapters, site: .feedForward, output: mlp, input: h2, mask: mask)
        return applyLayerAdapters(layerAdapters, site: .output, output: out, input: x, mask: mask)
    }
}

/// A Llama decoder with Hugging Face names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...,
/// `model.norm`, `lm_head`), loaded from GGUF.
public final class LlamaModel: Module, PrefixHost, ForwardHookHost, TokenObserverHost {
    /// Hooks run before every forward pass (X-LoRA's scaling pass).
    public var forwardHooks: [any ForwardPassHook] = []
    public let config: LlamaConfig
    public let embedTokens: Embedding
    public internal(set) var layers: [LlamaDecoderLayer]
    /// The layers as loaded (``layers`` differs after ``replicateLayers(_:)``).
    public internal(set) var originalLayers: [LlamaDecoderLayer] = []
    /// The `[start, end)` ranges ``layers`` was stacked from (PEFT's `layer_replication`); nil for the original.
    public internal(set) var layerReplication: [[Int]]?
    public let norm: RMSNorm
    /// The output projection; tied to `embedTokens` when the file has no `output.weight`.
    public let lmHead: Linear
    /// Whether `lm_head` shares `embed_tokens`' weight.
    public let tiedHead: Bool
    /// Prompt adapters (prompt tuning, P-tuning); the first enabled one's virtual tokens precede every sequence.
    public var promptAdapters: [any PromptAdapter] = []
    /// The hidden size (virtual tokens enter as input embeddings).
    public var embeddingWidth: Int { config.hiddenSize }
    /// Prefix adapters (prefix tuning); the first enabled one's keys and values precede every sequence in every
    /// layer.
    public var prefixAdapters: [any PrefixAdapter] = []
    /// Decoder layers (prefix tuning).
    public var prefixLayerCount: Int { layers.count }
    /// Observers that see each pass's tokens before the layers run (aLoRA).
    public var tokenObservers: [any TokenObserver] = []
    /// Runs the layer stack instead of the plain loop when set and enabled (dynamic depth: Dr.LLM's routers skip,
    /// run or repeat layers); nil by default. Not combined with prompt or prefix tuning.
    public var depthPolicy: (any LayerDepthPolicy)?
    /// The decoder layers' Linear modules see the observed rows one to one; `lm_head` does not.
    public var tokenAlignedPrefix: String { "model.layers." }
    /// Width of one layer's prefix keys: `kvHeads · headDim` (PEFT's `token_dim` under grouped-query attention).
    public var prefixWidth: Int { config.kvHeads * config.headDim }

    /// Builds the decoder from tensors keyed by Hugging Face names. `compactWeights` may supply a Linear weight,
    /// the token embeddings or the LM head in a compact frozen format instead (nil: take it from `weights`); a tied
    /// head shares the embeddings' compact table.
    public init(config: LlamaConfig, weights: (String) throws -> Tensor, tiedHead: Bool,
                compactWeights: (String) throws -> (any FrozenMatrix)? = { _ in nil }) throws {
        self.config = config
        self.tiedHead = tiedHead
        func expect(_ name: String, _ shape: [Int]) throws -> Tensor {
            let t = try weights(name)
            guard t.shape == shape else { throw GraftError.format("tensor '\(name)' has shape \(t.shape), config expects \(shape)") }
            return t
        }
        let h = config.hiddenSize, qd = config.heads * config.headDim, kvd = config.kvHeads * config.headDim
        let ff = config.intermediateSize
        func compact(_ name: String, _ shape: [Int]) throws -> (any FrozenMatrix)? {
            guard let matrix = try compactWeights(name) else { return nil }
            guard [matrix.rows, matrix.cols] == shape else {
                throw GraftError.format("tensor '\(name)' has shape [\(matrix.rows), \(matrix.cols)], config expects \(shape)")
            }
            return matrix
        }
        let embedShape = [config.vocabSize, h]
        let compactTable = try compact("model.embed_tokens.weight", embedShape)
        embedTokens = try compactTable.map { Embedding(compact: $0) }
            ?? Embedding(weight: try expect("model.embed_tokens.weight", embedShape))
        var layers: [LlamaDecoderLayer] = []
        for i in 0..<config.layers {
            let p = "model.layers.\(i)."
            func lin(_ n: String, _ shape: [Int]) throws -> Linear {
                if let matrix = try compact(p + n + ".weight", shape) { return Linear(compact: matrix, bias: nil) }
                return Linear(weight: try expect(p + n + ".weight", shape), bias: nil)
            }
            let attention = LlamaAttention(q: try lin("self_attn.q_proj", [qd, h]), k: try lin("self_attn.k_proj", [kvd, h]),
                                           v: try lin("self_attn.v_proj", [kvd, h]), o: try lin("self_attn.o_proj", [h, qd]),
                                           config: config, layerIndex: i)
            layers.append(LlamaDecoderLayer(
                inputNorm: RMSNorm(weight: try expect(p + "input_layernorm.weight", [h]), eps: config.rmsNormEps),
                attention: attention,
                postNorm: RMSNorm(weight: try expect(p + "post_attention_layernorm.weight", [h]), eps: config.rmsNormEps),
                gate: try lin("mlp.gate_proj", [ff, h]), up: try lin("mlp.up_proj", [ff, h]),
                down: try lin("mlp.down_proj", [h, ff]), config: config))
        }
        self.layers = layers
        originalLayers = layers
        norm = RMSNorm(weight: try expect("model.norm.weight", [h]), eps: config.rmsNormEps)
        if tiedHead, let table = compactTable {
            lmHead = Linear(compact: table, bias: nil)
            embedTokens.tiedHead = lmHead
        } else if !tiedHead, let matrix = try compact("lm_head.weight", embedShape) {
            lmHead = Linear(compact: matrix, bias: nil)
        } else {
            lmHead = Linear(weight: tiedHead ? embedTokens.weight : try expect("lm_head.weight", embedShape), bias: nil)
        }
        super.init(typeName: "LlamaForCausalLM")
        register("model", ModuleList(typeName: "LlamaModel", [
            ("embed_tokens", embedTokens), ("layers", ModuleList.numbered(layers)), ("norm", norm),
        ]))
        register("lm_head", lmHead)
        lmHead.note = tiedHead ? "tied to model.embed_tokens" : nil
    }

    /// The final hidden states `[batch, length, hidden]` (after `model.norm`).
    public func hiddenStates(_ batch: TokenBatch, cache: KVCache? = nil) throws -> Tensor {
        try hiddenStates(batch, cache: cache, keepVirtualTokens: false)
    }

    /// The final hidden states as PEFT's model returns them under prompt tuning, P-tuning, multitask prompt tuning
    /// or CPT: the enabled prompt adapter's virtual tokens stay in front, `[batch, virtual + length, hidden]`. The
    /// same as ``hiddenStates(_:cache:)`` without such an adapter.
    public func hiddenStatesWithVirtualTokens(_ batch: TokenBatch) throws -> Tensor {
        try hiddenStates(batch, cache: nil, keepVirtualTokens: true)
    }

    /// The final hidden states after `model.norm` (transformers' `hidden_states[-1]`).
    public func lastHiddenStates(_ batch: TokenBatch, cache: KVCache?) throws -> Tensor { try hiddenStates(batch, cache: cache) }

    private func hiddenStates(_ batch: TokenBatch, cache: KVCache?, keepVirtualTokens: Bool) throws -> Tensor {
        try batch.validate(vocabularySize: config.vocabSize)
        try runForwardHooks(batch, cache: cache)
        let offset = cache?.length ?? 0
        var positions = batch.resolvedPositions
        if offset > 0 { positions = positions.map { $0 + Int32(offset) } }
        if cache != nil && batch.batchSize != 1 {
            throw GraftError(.unsupported, "incremental decoding with a KV cache takes one sequence at a time")
        }
        try cache?.reserve(batch.length)
        for observer in tokenObservers where observer.isEnabled {
            observer.willRun(batch, caches: cache.map { [$0] } ?? [KVCache?](repeating: nil, count: batch.batchSize))
        }
        if depthPolicy?.isEnabled == true,
           promptAdapters.contains(where: { $0.isEnabled }) || prefixAdapters.contains(where: { $0.isEnabled }) {
            throw GraftError(.unsupported, "a dynamic-depth policy does not run with prompt or prefix tuning; disable one of them")
        }
        if let prompt = promptAdapters.first(where: { $0.isEnabled }), offset == 0 {
            return try hiddenStates(batch, prompts: prompt.virtualTokens(rows: batch.batchSize), cache: cache,
                                    keepVirtualTokens: keepVirtualTokens)
        }
        if let prefix = prefixAdapters.first(where: { $0.isEnabled }), offset == 0 {
            return try hiddenStates(batch, prefix: prefix, cache: cache)
        }
        var x = embedTokens.forward(batch.ids).reshaped([batch.batchSize, batch.length, config.hiddenSize])
        let lengths = cache == nil ? batch.lengths : nil
        let mask = AttentionMask(causal: true, keyLengths: lengths, segments: batch.segments, queryOffset: offset)
        if let routed = try runDepthPolicy(x, batch: batch, positions: positions, mask: mask, cache: cache) {
            x = routed
        } else {
            for (i, layer) in layers.enumerated() {
                x = layer.forward(x, positions: positions, mask: mask, cache: cache?.layers[i])
            }
        }
        cache?.length += batch.length
        return norm.forward(x)
    }

    /// Prompt tuning as PEFT runs a decoder: `n` virtual tokens at positions `0..<n` precede each sequence (whose
    /// tokens move to `n...`), every token attends to them causally, and a cache keeps them for decoding. Returns
    /// the real tokens' states only, `[batch, length, hidden]`, so losses and generation see the usual shape, unless
    /// `keepVirtualTokens`. `prompts`: `[batch, n, hidden]`, each row's own.
    private func hiddenStates(_ batch: TokenBatch, prompts: Tensor, cache: KVCache?, keepVirtualTokens: Bool) throws -> Tensor {
        guard batch.segments == nil else {
            throw GraftError(.unsupported, "prompt tuning needs one sequence per row (padded), not packed rows")
        }
        let virtual = prompts.shape[1], total = virtual + batch.length, rows = batch.batchSize, h = config.hiddenSize
        try cache?.reserve(total)
        guard total <= config.contextLength else {
            throw GraftError.invalid("\(virtual) virtual + \(batch.length) tokens exceed the context length \(config.contextLength)")
        }
        let words = embedTokens.forward(batch.ids).reshaped([rows, batch.length, h])
        var x = concat([prompts, words], dim: 1)
        let positions = (0..<rows).flatMap { _ in (0..<total).map(Int32.init) }
        let mask = AttentionMask(causal: true, keyLengths: cache == nil ? batch.lengths.map { $0 + virtual } : nil)
        for (i, layer) in layers.enumerated() {
            x = layer.forward(x, positions: positions, mask: mask, cache: cache?.layers[i])
        }
        cache?.length += total
        return norm.forward(keepVirtualTokens ? x : x.slice(dim: 1, virtual..<total))
    }

    /// Prefix tuning as PEFT runs a decoder: each layer's `n` prefix keys and values (used as cached keys, so not
    /// rotated) precede every sequence, whose tokens take positions `n...`; a cache keeps them for decoding.
    private func hiddenStates(_ batch: TokenBatch, prefix: any PrefixAdapter, cache: KVCache?) throws -> Tensor {
        guard batch.segments == nil else {
            throw GraftError(.unsupported, "prefix tuning needs one sequence per row (padded), not packed rows")
        }
        let n = prefix.prefix(layer: 0).keys.shape[0]
        try cache?.reserve(n + batch.length)
        guard n + batch.length <= config.contextLength else {
            throw GraftError.invalid("\(n) prefix + \(batch.length) tokens exceed the context length \(config.contextLength)")
        }
        let positions = batch.resolvedPositions.map { $0 + Int32(n) }
        var x = embedTokens.forward(batch.ids).reshaped([batch.batchSize, batch.length, config.hiddenSize])
        let mask = AttentionMask(causal: true, keyLengths: cache == nil ? batch.lengths.map { $0 + n } : nil, queryOffset: n)
        for (i, layer) in layers.enumerated() {
            x = layer.forward(x, positions: positions, mask: mask, cache: cache?.layers[i], prefix: prefix.prefix(layer: i))
        }
        cache?.length += n + batch.length
        return norm.forward(x)
    }

    /// The final hidden states `[batch, length, hidden]` of a batch in which row `r` continues its own sequence
    /// cached in `caches[r]` (batched generation): the first `batch.lengths[r]` tokens of row `r` are real, take
    /// positions from `caches[r].length` on, and are appended to that cache. Inference only.
    public func hiddenStates(_ batch: TokenBatch, rowCaches caches: [KVCache]) throws -> Tensor {
        try batch.validate(vocabularySize: config.vocabSize)
        guard caches.count == batch.batchSize else {
            throw GraftError.invalid("\(caches.count) KV caches for \(batch.batchSize) rows")
        }
        guard batch.segments == nil else {
            throw GraftError(.unsupported, "batched generation does not take packed rows (one sequence per row)")
        }
        if promptAdapters.contains(where: { $0.isEnabled }) || prefixAdapters.contains(where: { $0.isEnabled }) {
            throw GraftError(.unsupported, "batched generation does not support prompt or prefix tuning yet; generate one prompt at a time")
        }
        if forwardHooks.contains(where: { $0.isEnabled }) {
            throw GraftError(.unsupported, "batched generation does not support a model-level pass hook (X-LoRA's scaling pass) yet; generate one prompt at a time")
        }
        for r in 0..<batch.batchSize { try caches[r].reserve(batch.lengths[r]) }
        for observer in tokenObservers where observer.isEnabled { observer.willRun(batch, caches: caches) }
        var positions = [Int32](repeating: 0, count: batch.ids.count)
        for r in 0..<batch.batchSize {
            for i in 0..<batch.length { positions[r * batch.length + i] = Int32(caches[r].length + i) }
        }
        var x = embedTokens.forward(batch.ids).reshaped([batch.batchSize, batch.length, config.hiddenSize])
        if let routed = try runDepthPolicy(x, batch: batch, positions: positions, rowCaches: caches) {
            x = routed
        } else {
            for (i, layer) in layers.enumerated() {
                x = layer.forward(x, positions: positions, mask: AttentionMask(), cache: nil,
                                  rowCaches: caches.map { $0.layers[i] }, rowLengths: batch.lengths)
            }
        }
        for r in 0..<batch.batchSize { caches[r].length += batch.lengths[r] }
        return norm.forward(x)
    }

    /// Logits `[batch, length, vocab]`.
    public func logits(_ batch: TokenBatch) throws -> Tensor {
        lmHead.forward(try hiddenStates(batch))
    }
}
