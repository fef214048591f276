import GraftFuzzDriver
import GraftFuzzHarness

/// One input for `FuzzHarness.adapterConfig` (libFuzzer's `LLVMFuzzerTestOneInput`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzAdapterConfig(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzHarness.adapterConfig(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    return 0
}

/// Runs libFuzzer over `fuzzAdapterConfig`.
@main enum FuzzAdapterConfig {
    static func main() { runLibFuzzer(fuzzAdapterConfig) }
}
