import GraftIO
import GraftTensor
import GraftText

extension FuzzHarness {
    /// Parses the input as a GGUF file, dequantizes every tensor of a supported type, and builds the byte-level
    /// BPE tokenizer from its metadata, as loading a Llama GGUF does.
    public static func gguf(_ data: UnsafeRawBufferPointer) {
        expectGraftError("gguf") {
            let file = try GGUFFile(bytes: data, name: "fuzz.gguf")
            for key in file.metadataKeys {
                _ = file.string(key); _ = file.int(key); _ = file.float(key); _ = file.bool(key)
            }
            for info in file.tensors {
                try file.withRawBytes(info) { _ = $0.reduce(0, &+) }
                if info.type.canDequantize {
                    expectGraftError("gguf tensor") { _ = try file.tensor(info.name) }
                }
            }
            expectGraftError("gguf tokenizer") {
                let tokenizer = try BPETokenizer(gguf: file.metadata)
                let ids = tokenizer.encode("Hello, world! 123 ünïcode")
                _ = tokenizer.decode(ids + [-1, Int32.max, 0])
            }
        }
    }
}
