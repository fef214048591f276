import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor

extension GraftSession {
    /// Loads a llama.cpp GGUF LoRA adapter file (from `convert_lora_to_gguf.py` or ``exportGGUFLoRA(adapter:to:type:name:)``;
    /// format in ``GGUFLoRA``) as LoRA adapter `name` and makes it active. ``loadAdapter(directory:name:)`` calls
    /// this for a path ending in `.gguf`, so every door that loads an adapter directory takes such a file too.
    ///
    /// The adapter becomes PEFT's equivalent: `target_modules` the adapted modules, `r` the commonest rank (others in
    /// `rank_pattern`), `lora_alpha` the file's alpha (llama.cpp's alpha 0, "scale 1", becomes `lora_alpha = r` per
    /// module), `lora_B` of `q_proj`/`k_proj` with the converter's RoPE row permutation undone. Factors stored as
    /// F16, BF16 or Q8_0 are dequantized to float32. Checked as llama.cpp checks (`general.type`, `adapter.type`,
    /// the architecture, pairs complete, shapes `{in, r}` and `{r, out}` matching the base tensor), and more: every
    /// value finite, no tensor skipped (norm vectors, which llama.cpp ignores, are refused).
    @discardableResult
    public func loadGGUFLoRA(path: String, name: String = "default") throws -> NamedAdapter {
        guard case .decoder(let llama) = model.backbone else {
            throw GraftError(.unsupported, "\(path): a GGUF LoRA adapter applies to a Llama GGUF model; '\(model.path)' is not one")
        }
        let file = try GGUFFile(contentsOf: path)
        let generalType = file.string("general.type") ?? "(missing)"
        guard generalType == GGUFLoRA.generalType else {
            throw GraftError.format("\(path): general.type is '\(generalType)', expected '\(GGUFLoRA.generalType)' (a model file, not a LoRA adapter?)")
        }
        let adapterType = file.string("adapter.type") ?? "(missing)"
        guard adapterType == GGUFLoRA.adapterType else {
            throw GraftError(.unsupported, "\(path): adapter.type is '\(adapterType)'; Graft loads '\(GGUFLoRA.adapterType)' adapters")
        }
        let base = try GGUFFile(contentsOf: model.path)
        let arch = file.string("general.architecture") ?? "(missing)", baseArch = base.string("general.architecture") ?? "llama"
        guard arch == baseArch else {
            throw GraftError.format("\(path): general.architecture is '\(arch)', the model '\(model.path)' is '\(baseArch)'")
        }
        let alpha: Float
        if file.metadata["adapter.lora.alpha"] == nil {
            alpha = 0  // llama.cpp reads a missing alpha as 0: scale 1.
        } else {
            guard let a = file.float("adapter.lora.alpha"), a.isFinite else {
                throw GraftError.format("\(path): adapter.lora.alpha is \(file.metadata["adapter.lora.alpha"].map { "\($0)" } ?? "?"), not a finite number")
            }
            alpha = a
        }
        let pairs = try Self.ggufLoRAPairs(file, base: base, llama: llama)
        let config = try AdapterConfig(json: Self.ggufLoRAConfig(pairs, alpha: alpha), source: path)
        try addAdapter(name: name, config: config)
        do {
            let adapter = try adapted.adapter(name)
            adapter.markWeightsLoaded()
            var byPath: [String: LoRALayer] = [:]
            for (p, _, m) in adapter.layers { if let l = m as? LoRALayer { byPath[p] = l } }
            for pair in pairs {
                guard let layer = byPath[pair.path] else {
                    throw GraftError(.internalError, "\(path): no LoRA layer was made for '\(pair.path)'")
                }
                var b = try file.tensor(pair.b)
                if let heads = GGUFLoRA.permutedHeads(pair.path, config: llama.config) {
                    guard b.shape[0] % (2 * heads) == 0 else {
                        throw GraftError.format("\(path): '\(pair.b)' has \(b.shape[0]) rows, not whole pairs of \(heads) heads")
                    }
                    b = LlamaModel.unpermuteRoPERows(b, heads: heads)
                }
                for (tensorName, parameter, t) in [(pair.a, "lora_A.weight", try file.tensor(pair.a)), (pair.b, "lora_B.weight", b)] {
                    if let i = (0..<t.count).first(where: { !t.pointer[$0].isFinite }) {
                        throw GraftError.format("\(path): '\(tensorName)' element \(i) is \(t.pointer[i])")
                    }
                    do {
                        try layer.load(parameter, from: t)
                    } catch let e as GraftError {
                        throw GraftError(e.code, "\(path): \(tensorName): \(e.message)")
                    }
                }
            }
            return adapter
        } catch {
            try? adapted.deleteAdapter(name)
            throw error
        }
    }

    /// One adapted tensor of a GGUF LoRA file: its module path, tensor names and rank.
    struct GGUFLoRAPair {
        let path: String, a: String, b: String, rank: Int
    }

    /// The file's `lora_a`/`lora_b` pairs, checked against the base model's tensors as llama.cpp checks them.
    static func ggufLoRAPairs(_ file: GGUFFile, base: GGUFFile, llama: LlamaModel) throws -> [GGUFLoRAPair] {
        var halves: [String: (a: GGUFTensorInfo?, b: GGUFTensorInfo?)] = [:]
        for info in file.tensors {
            if info.name.hasSuffix(".lora_a") {
                halves[String(info.name.dropLast(7)), default: (nil, nil)].a = info
            } else if info.name.hasSuffix(".lora_b") {
                halves[String(info.name.dropLast(7)), default: (nil, nil)].b = info
            } else if info.name.hasSuffix("_norm.weight") {
                throw GraftError(.unsupported, "\(file.path): '\(info.name)' is a norm vector (from mergekit-extract-lora); Graft applies LoRA pairs only (llama.cpp ignores it)")
            } else {
                throw GraftError.format("\(file.path): tensor '\(info.name)' is neither a .lora_a nor a .lora_b")
            }
        }
        guard !halves.isEmpty else { throw GraftError.format("\(file.path): the adapter holds no LoRA tensors") }
        let baseNames = Dictionary(GGUFLoRA.baseTensorNames(base).map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        var out: [GGUFLoRAPair] = []
        for (tensor, half) in halves.sorted(by: { $0.key < $1.key }) {
            guard let a = half.a, let b = half.b else {
                throw GraftError.format("\(file.path): the LoRA pair for '\(tensor)' lacks its \(half.a == nil ? "lora_a" : "lora_b")")
            }
            if tensor == "token_embd.weight" {
                throw GraftError(.unsupported, "\(file.path): a LoRA on token_embd (embedding) is not supported by Graft")
            }
            guard let path = baseNames[tensor], let info = base.tensorInfo(tensor), info.shape.count == 2 else {
                throw GraftError.format("\(file.path): LoRA tensor '\(tensor)' does not exist in the base model '\(base.path)' (wrong base model?)")
            }
            // Shapes outermost first: base [out, in], lora_a [r, in], lora_b [out, r].
            guard a.shape.count == 2, b.shape.count == 2, a.shape[1] == info.shape[1], b.shape[0] == info.shape[0] else {
                throw GraftError.format("\(file.path): '\(tensor)' has lora_a \(a.shape) and lora_b \(b.shape), the base tensor is \(info.shape) (wrong base model?)")
            }
            guard a.shape[0] == b.shape[1], a.shape[0] > 0, a.shape[0] <= AdapterConfig.maximumSize else {
                throw GraftError.format("\(file.path): '\(tensor)' lora_a has rank \(a.shape[0]) but lora_b \(b.shape[1]) (lora_a must be stored transposed, {in, r})")
            }
            out.append(GGUFLoRAPair(path: path, a: a.name, b: b.name, rank: a.shape[0]))
        }
        return out
    }

    /// PEFT's config for the pairs: llama.cpp scales each pair by `alpha / r_pair` (by 1 when alpha is 0).
    static func ggufLoRAConfig(_ pairs: [GGUFLoRAPair], alpha: Float) -> [String: Any] {
        var counts: [Int: Int] = [:]
        for p in pairs { counts[p.rank, default: 0] += 1 }
        let r = counts.max { ($0.value, -$0.key) < ($1.value, -$1.key) }?.key ?? 8
        var rankPattern: [String: Any] = [:], alphaPattern: [String: Any] = [:]
        for p in pairs where p.rank != r {
            let key = NSRegularExpression.escapedPattern(for: p.path)
            rankPattern[key] = p.rank
            if alpha == 0 { alphaPattern[key] = p.rank }
        }
        return [
            "peft_type": "LORA", "r": r, "lora_alpha": alpha == 0 ? Double(r) : Double(alpha),
            "target_modules": pairs.map(\.path), "rank_pattern": rankPattern, "alpha_pattern": alphaPattern,
            "lora_dropout": 0.0, "bias": "none",
        ]
    }
}
