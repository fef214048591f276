import GraftFuzzDriver
import GraftFuzzHarness

/// One input for `FuzzHarness.frame` (libFuzzer's `LLVMFuzzerTestOneInput`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFrame(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzHarness.frame(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    return 0
}

/// Runs libFuzzer over `fuzzFrame`.
@main enum FuzzFrame {
    static func main() { runLibFuzzer(fuzzFrame) }
}
