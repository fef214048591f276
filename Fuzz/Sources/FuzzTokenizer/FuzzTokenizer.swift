import GraftFuzzDriver
import GraftFuzzHarness

/// One input for `FuzzHarness.tokenizer` (libFuzzer's `LLVMFuzzerTestOneInput`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTokenizer(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzHarness.tokenizer(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    return 0
}

/// Runs libFuzzer over `fuzzTokenizer`.
@main enum FuzzTokenizer {
    static func main() { runLibFuzzer(fuzzTokenizer) }
}
