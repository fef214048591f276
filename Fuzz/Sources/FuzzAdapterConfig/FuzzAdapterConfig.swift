#if canImport(Glibc)
import Glibc
#endif
import GraftFuzzHarness

/// One input for `FuzzHarness.adapterConfig` (libFuzzer's `LLVMFuzzerTestOneInput`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzAdapterConfig(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzHarness.adapterConfig(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    return 0
}

/// libFuzzer's driver, in the runtime `-sanitize=fuzzer` links (there is no Swift module declaring it).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32

/// SwiftPM links an executable target's own entry point as `main` (so libFuzzer's `main` is not used):
/// it hands the command line to libFuzzer's driver and exits with its status.
@main enum FuzzAdapterConfig {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv, fuzzAdapterConfig))
    }
}
