import GraftIO
import GraftTensor

extension FuzzHarness {
    /// Parses the input as a safetensors file and reads every tensor it declares (floats as Float32, integers
    /// as Int64), as loading a model or a PEFT adapter does.
    public static func safeTensors(_ data: UnsafeRawBufferPointer) {
        expectGraftError("safetensors") {
            let file = try SafeTensorsFile(bytes: data, name: "fuzz.safetensors")
            _ = file.metadata
            for name in file.names {
                guard let info = file.info(name) else { fatalError("safetensors: names lists '\(name)' but info has none") }
                if info.dtype.isFloatingPoint {
                    let t = try file.tensor(name)
                    guard t.shape == info.shape else { fatalError("safetensors: '\(name)' read with shape \(t.shape), declared \(info.shape)") }
                } else {
                    _ = try? file.int64s(name)
                }
                try file.withRawBytes(name) { _ = $0.reduce(0, &+) }
            }
        }
    }
}
