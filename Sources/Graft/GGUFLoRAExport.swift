import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor

/// What ``GraftSession/exportGGUFLoRA(adapter:to:type:name:)`` wrote.
public struct GGUFLoRAExportReport: Sendable {
    /// The file written.
    public let path: String
    /// Its size in bytes.
    public let bytes: Int
    /// The adapted tensors (pairs `lora_a` + `lora_b`).
    public let pairs: Int
    /// `adapter.lora.alpha` as written.
    public let alpha: Float
    /// How many factors of each ggml type were written (`Q8_0` exports have F16 `lora_b`s).
    public let tensorTypes: [String: Int]
    /// Modules whose `lora_b` carries a rescale because their scaling is not `alpha / r` (rsLoRA, `alpha_pattern`).
    public let rescaled: [String]
}

extension GraftSession {
    /// Writes LoRA adapter `name` as llama.cpp's GGUF LoRA file at `path` (crash-safely), as
    /// `convert_lora_to_gguf.py --outtype <type>` converts the adapter's PEFT directory (see ``GGUFLoRA``), so
    /// `llama-cli --lora`, `llama_adapter_lora_init` and llama-cpp-python's `lora_path` apply it to this GGUF base.
    ///
    /// The session must hold a Llama GGUF model. The adapter must be plain LoRA on Linear layers (no DoRA, no
    /// `modules_to_save`, no unconverted PiSSA-style initialization). llama.cpp has one `alpha` per file, so a
    /// module whose scaling is not `lora_alpha / r` (rsLoRA's `α/√r`, `alpha_pattern`) gets the ratio folded into its
    /// `lora_b`, keeping the product exact (the converter itself would write those adapters with the wrong scale).
    @discardableResult
    public func exportGGUFLoRA(adapter name: String, to path: String, type: GGUFLoRA.TensorType = .f32,
                               name modelName: String? = nil) throws -> GGUFLoRAExportReport {
        guard case .decoder(let llama) = model.backbone else {
            throw GraftError(.unsupported, "GGUF LoRA export: '\(model.path)' is not a Llama GGUF model; llama.cpp's adapters apply to GGUF bases only")
        }
        let a = try adapted.adapter(name)
        guard a.config.peftType == "LORA" else {
            throw GraftError(.unsupported, "GGUF LoRA export: adapter '\(name)' is \(a.config.peftType); llama.cpp's adapter files hold LoRA only")
        }
        if let (path, _, _) = a.savedModules.first {
            throw GraftError(.unsupported, "GGUF LoRA export: adapter '\(name)' trains '\(path)' in full (modules_to_save); llama.cpp's LoRA files hold lora_A/lora_B pairs only")
        }
        if let (path, _) = a.modules.first {
            throw GraftError(.unsupported, "GGUF LoRA export: adapter '\(name)' changes module '\(path)', which is not a Linear LoRA pair")
        }
        let alpha = Float(try a.config.double("lora_alpha", default: 8))
        let base = try GGUFFile(contentsOf: model.path)
        let names = GGUFLoRA.baseTensorNames(base)
        var writer = GGUFWriter()
        try writer.add("general.architecture", .string(base.string("general.architecture") ?? "llama"))
        try writer.add("general.type", .string(GGUFLoRA.generalType))
        try writer.add("adapter.type", .string(GGUFLoRA.adapterType))
        try writer.add("general.name", .string(modelName ?? name))
        try writer.add("adapter.lora.alpha", .float32(alpha))
        try writer.add("general.quantization_version", .uint32(GGUFLoRA.quantizationVersion))

        var types: [String: Int] = [:], rescaled: [String] = []
        // The converter's order: the PEFT state dict's keys, sorted.
        for (path, _, method) in a.layers.sorted(by: { $0.path < $1.path }) {
            guard let lora = method as? LoRALayer else {
                throw GraftError(.unsupported, "GGUF LoRA export: '\(path)' of adapter '\(name)' is not a LoRA layer")
            }
            guard lora.magnitude == nil else {
                throw GraftError(.unsupported, "GGUF LoRA export: adapter '\(name)' is DoRA ('\(path)' has a magnitude vector); llama.cpp applies plain LoRA only (merge it into the base instead)")
            }
            guard lora.initialFactors == nil else {
                throw GraftError(.unsupported, "GGUF LoRA export: adapter '\(name)' keeps an SVD initialization's residual at '\(path)'; save it as PEFT does (plain LoRA) and load that directory first")
            }
            guard let tensorName = names[path] else {
                let tied = path.hasSuffix("lm_head") && llama.tiedHead
                throw GraftError(.notFound, "GGUF LoRA export: '\(model.path)' has no tensor for '\(path).weight'" +
                                 (tied ? " (lm_head is tied to token_embd; llama.cpp's converter refuses a LoRA on it)" : ""))
            }
            var b = lora.loraB
            let ratio = lora.scaling / GGUFLoRA.llamaScale(alpha: alpha, rank: lora.rank)
            if ratio != 1 {
                b = withNoGrad { b * ratio }
                rescaled.append(path)
            }
            if let heads = GGUFLoRA.permutedHeads(path, config: llama.config) {
                guard b.shape[0] % (2 * heads) == 0 else {
                    throw GraftError.format("GGUF LoRA export: '\(path)' has \(b.shape[0]) rows, not whole pairs of \(heads) heads")
                }
                b = LlamaModel.permuteRoPERows(b, heads: heads)
            }
            for (suffix, factor) in [("lora_a", lora.loraA), ("lora_b", b)] {
                let ggml = type.ggmlType(rowLength: factor.shape[1])
                try writer.addTensor("\(tensorName).\(suffix)", factor, type: ggml)
                types[ggml.name, default: 0] += 1
            }
        }
        let bytes = writer.serialized()
        try AtomicFile.write(bytes, to: path)
        return GGUFLoRAExportReport(path: path, bytes: bytes.count, pairs: a.layers.count, alpha: alpha,
                                    tensorTypes: types, rescaled: rescaled)
    }
}
