import ArgumentParser
import CGraftSystem
import Foundation
import Graft
import GraftAssets

/// The `graft` command line: thin wrappers over the Graft library.
@main
struct GraftCommand: ParsableCommand {
    /// Line-buffers stdout so reports interleave correctly with the progress bar on stderr.
    static func main() {
        cgraft_line_buffer_stdout()
        self.main(nil)
    }

    static let configuration = CommandConfiguration(
        commandName: "graft",
        abstract: "Parameter-efficient fine-tuning on the CPU.",
        subcommands: [Demo.self, Train.self, Merge.self, Compress.self, ExportGGUFLoRA.self, Inspect.self, Methods.self, Generate.self, Encode.self, Bench.self, Moefy.self, Depth.self])
}

/// Resolves a model argument: a path, or one of the asset names fetched by scripts/fetch-assets.
func resolveModelPath(_ name: String) -> String { AssetCache.resolveModelPath(name) }

/// Runs `body`, turning a GraftError into a one-line message and exit code 1.
func run(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let error as GraftError {
        ScaleOut.abortJobIfDistributed(error.message)
        FileHandle.standardError.write(Data("graft: error: \(error.message)\n".utf8))
        throw ExitCode(1)
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a model's module tree with shapes and parameter counts (to choose target_modules).")

    @Argument(help: "Model: a transformers directory, a .gguf file, or 'minilm' / 'smollm2' from the asset cache.")
    var model: String

    @Flag(help: "Print every layer instead of folding repeated ones.")
    var full = false

    func run() throws {
        try graft.run {
            let m = try GraftModel(path: resolveModelPath(model))
            print(ModelInspector.report(m, full: full))
        }
    }
}

struct Encode: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Tokenize text with a model's tokenizer and print the ids.")

    @Argument(help: "Model path or asset name.")
    var model: String
    @Argument(help: "Text to tokenize.")
    var text: String

    func run() throws {
        try graft.run {
            let m = try GraftModel(path: resolveModelPath(model))
            print(m.encode(text).map(String.init).joined(separator: " "))
        }
    }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Generate text from a decoder model, streaming tokens.")

    @Option(help: "Model path or asset name.")
    var model: String = "smollm2"
    @Option(help: "The prompt, used as the user turn of the chat template unless --raw.")
    var prompt: String
    @Flag(help: "Send the prompt as is, without the chat template.")
    var raw = false
    @Option(help: "Maximum new tokens.")
    var maxTokens: Int = 64
    @Option(help: "Sampling temperature (0 = greedy).")
    var temperature: Float = 0
    @Option(help: "Nucleus sampling threshold.")
    var topP: Float = 1
    @Option(help: "Sampling seed.")
    var seed: UInt64 = 0
    @Option(help: "A PEFT adapter directory to apply (e.g. from graft train --task causal-lm).")
    var adapter: String?
    @Flag(name: .customLong("fast-decode"),
          help: "Fast mode: int8 activations against the GGUF base's Q4_1/Q8_0 weights (logits deviate slightly).")
    var fastDecode = false

    func run() throws {
        try graft.run {
            var modelOptions = ModelOptions()
            modelOptions.task = .causalLM
            let session = try AssetCache.openSession(model, options: modelOptions)
            if let adapter { try session.loadAdapter(directory: adapter) }
            var sampling = SamplingOptions()
            sampling.maxNewTokens = maxTokens
            sampling.temperature = temperature
            sampling.topP = topP
            sampling.seed = seed
            sampling.fastDecode = fastDecode
            try sampling.validate()
            let text = raw ? prompt : try session.chatPrompt(prompt)
            _ = try session.generate(prompt: session.model.tokenizer.encode(text, addSpecialTokens: false),
                                     parameters: sampling.generationParameters(stopTokens: []), stopAtEOS: true) { _, piece in
                FileHandle.standardOutput.write(Data(piece.utf8))
                return true
            }
            print()
        }
    }
}
