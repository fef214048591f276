import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// llama.cpp's GGUF LoRA adapter format, as its `convert_lora_to_gguf.py` writes it and `llama-adapter.cpp` reads it.
///
/// - Metadata: `general.architecture` (the base model's, e.g. `llama`), `general.type = "adapter"`,
///   `adapter.type = "lora"`, `adapter.lora.alpha` (float32; llama.cpp scales each pair by `alpha / r` with `r`
///   the pair's own rank, or by 1 when alpha is 0), `general.quantization_version = 2`.
/// - Tensors: per adapted Linear, `<base tensor name>.lora_a` holding PEFT's `lora_A [r, in]` (GGUF dimensions
///   `{in, r}`) and `<base tensor name>.lora_b` holding `lora_B [out, r]` (`{r, out}`), e.g.
///   `blk.3.attn_q.weight.lora_a`. For `q_proj` and `k_proj` the converter applies the same Q/K row permutation
///   to `lora_B` that it applies to the base weights (RoPE's interleaved pairs; ``LlamaModel/permuteRoPERows(_:heads:)``),
///   so `lora_B·lora_A` is a delta of the GGUF tensor itself; `lora_A` is unchanged.
/// - Tensor types follow the converter's `--outtype`: F32 (its default), F16, BF16, or Q8_0, where a tensor whose
///   rows are not whole 32-element blocks (`lora_b`, whose rows are `r` long) falls back to F16 as gguf-py's
///   quantizer does.
public enum GGUFLoRA {
    /// `general.type` of an adapter file.
    public static let generalType = "adapter"
    /// `adapter.type` of a LoRA file.
    public static let adapterType = "lora"
    /// The ggml quantization version the converter records (`general.quantization_version`).
    public static let quantizationVersion: UInt32 = 2

    /// The tensor type the file's factors are written in: the converter's `--outtype` values.
    public enum TensorType: String, Sendable, CaseIterable {
        /// float32, the converter's default: the factors exactly.
        case f32
        /// IEEE half precision (relative error ≤ 2⁻¹¹ per element).
        case f16
        /// bfloat16 (relative error ≤ 2⁻⁸ per element).
        case bf16
        /// Q8_0 blocks of 32 (error ≤ max|block|/254 per element); rows that are not whole blocks fall back to F16.
        case q8_0

        /// The ggml type a factor with rows of `rowLength` elements is written in.
        public func ggmlType(rowLength: Int) -> GGMLType {
            switch self {
            case .f32: return .f32
            case .f16: return .f16
            case .bf16: return .bf16
            case .q8_0: return rowLength % GGMLType.q8_0.blockSize == 0 ? .q8_0 : .f16
            }
        }

        /// Parses a converter `--outtype` name (`f32`, `f16`, `bf16`, `q8_0`, any case).
        public init(name: String) throws {
            guard let t = TensorType(rawValue: name.lowercased()) else {
                throw GraftError.invalid("GGUF LoRA tensor type '\(name)' is not one of \(TensorType.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            self = t
        }
    }

    /// The base model's GGUF tensor names by Graft module path (`model.layers.0.self_attn.q_proj` →
    /// `blk.0.attn_q.weight`), for the tensors the file holds.
    static func baseTensorNames(_ base: GGUFFile) -> [String: String] {
        var out: [String: String] = [:]
        for info in base.tensors {
            guard let hf = LlamaModel.huggingFaceName(forGGUF: info.name), hf.hasSuffix(".weight") else { continue }
            out[String(hf.dropLast(".weight".count))] = info.name
        }
        return out
    }

    /// The number of heads whose rows the converter permutes in module `path`'s weight (nil when it does not).
    static func permutedHeads(_ path: String, config: LlamaConfig) -> Int? {
        if path.hasSuffix("self_attn.q_proj") { return config.heads }
        if path.hasSuffix("self_attn.k_proj") { return config.kvHeads }
        return nil
    }

    /// llama.cpp's multiplier of `lora_b · lora_a` for a pair of rank `rank` (`llama_adapter_lora_weight::get_scale`).
    static func llamaScale(alpha: Float, rank: Int) -> Float { alpha != 0 ? alpha / Float(rank) : 1 }
}
