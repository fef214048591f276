import GraftIO
import GraftTensor

/// Loading a Llama decoder from a GGUF file: tensor names, the Q/K row order llama.cpp's converter uses, and
/// weights kept in their block formats.
extension LlamaModel {
    /// Maps a GGUF tensor name to its Hugging Face name (`blk.0.attn_q.weight` → `model.layers.0.self_attn.q_proj.weight`).
    public static func huggingFaceName(forGGUF name: String) -> String? {
        let fixed = ["token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"]
        if let n = fixed[name] { return n }
        let parts = name.split(separator: ".")
        guard parts.count == 4, parts[0] == "blk", let layer = Int(parts[1]) else { return nil }
        let map = ["attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                   "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                   "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"]
        guard let m = map[String(parts[2])] else { return nil }
        return "model.layers.\(layer).\(m).\(parts[3])"
    }

    /// Loads a Llama GGUF file in transformers' layout, undoing the converter's Q/K row permutation (RoPE then
    /// rotates the two halves of each head). With `keepQuantized` (the default) every Linear weight and the token
    /// embeddings stay in their block formats, read in place from the file's memory map (``QuantizedMatrix``,
    /// decoded tile by tile inside each product: the float32 values are the same, the memory is the file's); norms,
    /// and everything when `keepQuantized` is false, are dequantized to float32.
    public convenience init(gguf: GGUFFile, keepQuantized: Bool = true) throws {
        let config = try LlamaConfig(gguf: gguf)
        var byHF: [String: String] = [:]
        for info in gguf.tensors {
            if let hf = LlamaModel.huggingFaceName(forGGUF: info.name) { byHF[hf] = info.name }
        }
        let tied = byHF["lm_head.weight"] == nil
        func heads(_ hf: String) -> Int? {
            if hf.hasSuffix("q_proj.weight") { return config.heads }
            if hf.hasSuffix("k_proj.weight") { return config.kvHeads }
            return nil
        }
        try self.init(config: config, weights: { hf in
            guard let name = byHF[hf] else {
                throw GraftError(.notFound, "\(gguf.path): no tensor for '\(hf)' in the file")
            }
            let t = try gguf.tensor(name)
            if let n = heads(hf) { return LlamaModel.unpermuteRoPERows(t, heads: n) }
            return t
        }, tiedHead: tied, compactWeights: { hf in
            guard keepQuantized, let name = byHF[hf], let info = gguf.tensorInfo(name), info.type != .f32,
                  info.type.canDequantize, info.shape.count == 2 else { return nil }
            let rowOrder = heads(hf).map { LlamaModel.unpermutedRowOrder(rows: info.shape[0], heads: $0) }
            return try gguf.withRawBytes(info) { bytes in
                try QuantizedMatrix(name: "\(gguf.path): \(name)", type: info.type, rows: info.shape[0],
                                    cols: info.shape[1], bytes: bytes, rowOrder: rowOrder, borrowingFrom: gguf)
            }
        })
    }

    /// The GGUF row each transformers row of a Q/K weight comes from (``unpermuteRoPERows(_:heads:)`` as an index).
    static func unpermutedRowOrder(rows: Int, heads: Int) -> [Int] {
        let d = rows / max(heads, 1), half = d / 2
        var order = Array(0..<rows)
        for h in 0..<heads {
            for i in 0..<half {
                for j in 0..<2 { order[h * d + j * half + i] = h * d + 2 * i + j }
            }
        }
        return order
    }

    /// The inverse of ``unpermuteRoPERows(_:heads:)``: transformers' Q/K rows back in the GGUF converter's
    /// interleaved order, for writing GGUF files.
    public static func permuteRoPERows(_ w: Tensor, heads: Int) -> Tensor { reorderRoPERows(w, heads: heads, toGGUF: true) }

    /// Inverts llama.cpp's converter permutation of Q/K rows: GGUF row `h·d + 2i + j` is transformers' row
    /// `h·d + j·d/2 + i`.
    public static func unpermuteRoPERows(_ w: Tensor, heads: Int) -> Tensor { reorderRoPERows(w, heads: heads, toGGUF: false) }

    /// Moves each head's rows between GGUF's interleaved order (`2i + j`) and transformers' halves (`j·d/2 + i`).
    private static func reorderRoPERows(_ w: Tensor, heads: Int, toGGUF: Bool) -> Tensor {
        let rowsN = w.shape[0], cols = w.shape[1], d = rowsN / heads, half = d / 2
        let out = Tensor(zeros: w.shape)
        for h in 0..<heads {
            for i in 0..<half {
                for j in 0..<2 {
                    let interleaved = h * d + 2 * i + j, halves = h * d + j * half + i
                    let (dst, src) = toGGUF ? (interleaved, halves) : (halves, interleaved)
                    (out.pointer + dst * cols).update(from: w.pointer + src * cols, count: cols)
                }
            }
        }
        return out
    }
}
