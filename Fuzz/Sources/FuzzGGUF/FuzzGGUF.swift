import GraftFuzzDriver
import GraftFuzzHarness

/// One input for `FuzzHarness.gguf` (libFuzzer's `LLVMFuzzerTestOneInput`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzGGUF(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzHarness.gguf(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    return 0
}

/// Runs libFuzzer over `fuzzGGUF`.
@main enum FuzzGGUF {
    static func main() { runLibFuzzer(fuzzGGUF) }
}
