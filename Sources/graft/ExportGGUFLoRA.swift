import ArgumentParser
import Foundation
import Graft
import GraftAssets

/// `graft export-gguf-lora`: a PEFT LoRA directory trained on a Llama GGUF model, written as llama.cpp's GGUF LoRA
/// adapter (what `convert_lora_to_gguf.py` makes of it), for `llama-cli -m base.gguf --lora adapter.gguf`.
struct ExportGGUFLoRA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export-gguf-lora",
        abstract: "Write a PEFT LoRA adapter as a llama.cpp GGUF LoRA file.",
        discussion: """
            The file is what llama.cpp's convert_lora_to_gguf.py writes: general.type "adapter", adapter.type \
            "lora", adapter.lora.alpha, tensors blk.N.<name>.weight.lora_a/.lora_b with q/k rows in the GGUF \
            RoPE order. Graft loads such files back wherever it takes an adapter directory (a path ending in .gguf).
              graft export-gguf-lora --adapter out/smol --model smollm2 --output out/smol-lora.gguf
            """)

    @Option(help: "The PEFT LoRA adapter directory.")
    var adapter: String
    @Option(help: "The base model: a Llama .gguf file or 'smollm2'.")
    var model: String = "smollm2"
    @Option(help: "The .gguf file to write.")
    var output: String
    @Option(help: "Tensor type of the factors, the converter's --outtype: f32, f16, bf16 or q8_0 (rows that are not whole Q8_0 blocks fall back to f16).")
    var outtype: String = "f32"

    func run() throws {
        try graft.run {
            let type = try GGUFLoRA.TensorType(name: outtype)
            var options = ModelOptions()
            options.task = .causalLM
            let session = try AssetCache.openSession(model, options: options)
            try session.loadAdapter(directory: adapter, name: "lora")
            let name = URL(fileURLWithPath: adapter).standardizedFileURL.lastPathComponent
            let r = try session.exportGGUFLoRA(adapter: "lora", to: output, type: type, name: name)
            let types = r.tensorTypes.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
            print("wrote \(r.path): \(r.pairs) LoRA pairs (\(types)), alpha \(r.alpha), \(r.bytes) bytes")
            if !r.rescaled.isEmpty {
                print("note: \(r.rescaled.count) modules scale by other than lora_alpha/r (rsLoRA or alpha_pattern); their lora_b carries the ratio")
            }
        }
    }
}
