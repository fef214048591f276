import GraftFuzzDriver
import GraftFuzzHarness

/// One input for `FuzzHarness.safeTensors` (libFuzzer's `LLVMFuzzerTestOneInput`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSafeTensors(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzHarness.safeTensors(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    return 0
}

/// Runs libFuzzer over `fuzzSafeTensors`.
@main enum FuzzSafeTensors {
    static func main() { runLibFuzzer(fuzzSafeTensors) }
}
