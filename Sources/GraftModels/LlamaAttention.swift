import GraftTensor

/// Something attached to a decoder's attention block that adds an attention of its own to the block's result
/// (LLaMA-Adapter's gated attention over learned prompts).
public protocol AttentionAdapter: AnyObject {
    /// Whether the adapter currently takes part in forward passes.
    var isEnabled: Bool { get }
    /// The term added to the attention result before `o_proj`, `[batch, length, heads · headDim]`, for the block's
    /// rotated queries `query` (same shape). Recorded for autograd.
    func attentionOutput(query: Tensor, attention: LlamaAttention) -> Tensor
}

/// transformers' `LlamaAttention`: grouped-query self-attention with RoPE, `q_proj`, `k_proj`, `v_proj`, `o_proj`.
/// ``AttentionAdapter``s add their own attention to its result before the output projection.
public final class LlamaAttention: Module {
    /// The projections (`[heads · headDim, hidden]`, `[kvHeads · headDim, hidden]` ×2, `[hidden, heads · headDim]`).
    public let qProj: Linear, kProj: Linear, vProj: Linear, oProj: Linear
    /// The decoder's hyper-parameters (heads, key/value heads, head width, RoPE base).
    public let config: LlamaConfig
    /// This block's layer, `0..<config.layers`.
    public let layerIndex: Int
    /// Adapters adding their attention to this block's (LLaMA-Adapter); none by default.
    public var adapters: [any AttentionAdapter] = []

    init(q: Linear, k: Linear, v: Linear, o: Linear, config: LlamaConfig, layerIndex: Int) {
        qProj = q; kProj = k; vProj = v; oProj = o
        self.config = config
        self.layerIndex = layerIndex
        super.init(typeName: "LlamaAttention")
        register("q_proj", q)
        register("k_proj", k)
        register("v_proj", v)
        register("o_proj", o)
    }

    /// The block's output `o_proj(attention + Σ adapters)` for the normed input `h` `[batch, length, hidden]`.
    /// `cache` (when generating) holds this layer's earlier keys and values; with `rowCaches` (one per batch row,
    /// batched generation) only the first `rowLengths[r]` positions of row `r` are real, and each row attends to its
    /// own cache and its real positions. `prefix`: keys and values `[n, kvHeads · headDim]` every row attends to
    /// before its own (prefix tuning).
    func forward(_ h: Tensor, positions: [Int32], mask: AttentionMask, cache: KVCache.Layer?,
                 rowCaches: [KVCache.Layer]?, rowLengths: [Int]?, prefix: (keys: Tensor, values: Tensor)?) -> Tensor {
        let b = h.shape[0], t = h.shape[1]
        let projected = Linear.forward(h, sharedBy: [qProj, kProj, vProj])
        let q = rope(projected[0].reshaped([b * t, config.heads, config.headDim]),
                     positions: positions, headDim: config.headDim, base: config.ropeBase).reshaped([b, t, config.heads * config.headDim])
        var k = rope(projected[1].reshaped([b * t, config.kvHeads, config.headDim]),
                     positions: positions, headDim: config.headDim, base: config.ropeBase).reshaped([b, t, config.kvHeads * config.headDim])
        var v = projected[2]
        if let prefix {
            let n = prefix.keys.shape[0], w = config.kvHeads * config.headDim
            k = concat([concat([Tensor](repeating: prefix.keys.reshaped([1, n, w]), count: b), dim: 0), k], dim: 1)
            v = concat([concat([Tensor](repeating: prefix.values.reshaped([1, n, w]), count: b), dim: 0), v], dim: 1)
        }
        if let cache {
            cache.append(keys: k, values: v)
            if let keys = cache.keys, let values = cache.values { k = keys; v = values }
        }
        var attn: Tensor
        if let rowCaches, let rowLengths {
            // Each row appends its real positions to its own cache, then all rows' heads attend in one parallel loop.
            let width = config.kvHeads * config.headDim
            var rows: [CachedAttentionRow] = []
            rows.reserveCapacity(b)
            for r in 0..<b {
                let c = rowCaches[r], offset = c.length
                c.append(keys: k.pointer + r * t * width, values: v.pointer + r * t * width, count: rowLengths[r], width: width)
                if let kr = c.keys, let vr = c.values {
                    rows.append(CachedAttentionRow(keys: kr.pointer, values: vr.pointer, length: c.length, queryOffset: offset))
                } else {
                    rows.append(CachedAttentionRow(keys: k.pointer, values: v.pointer, length: 0, queryOffset: offset))
                }
            }
            // The caches' blocks outlive the pass (the rows' pointers stay valid: nothing appends until it returns).
            attn = withExtendedLifetime(rowCaches) {
                rowCachedAttention(query: q, rows: rows, heads: config.heads, kvHeads: config.kvHeads)
            }
        } else {
            attn = scaledDotProductAttention(query: q, key: k, value: v, heads: config.heads, kvHeads: config.kvHeads, mask: mask)
        }
        for adapter in adapters where adapter.isEnabled { attn = attn + adapter.attentionOutput(query: q, attention: self) }
        return oProj.forward(attn)
    }
}
