#if canImport(Glibc)
import Glibc
#endif

/// libFuzzer's driver, in the runtime `-sanitize=fuzzer` links (there is no Swift module declaring it).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32

/// Hands the command line to libFuzzer's driver with `testOneInput` (the target's `LLVMFuzzerTestOneInput`) and
/// exits with its status. SwiftPM links an executable target's own entry point as `main`, so a fuzz target's
/// `main` calls this instead of relying on libFuzzer's.
public func runLibFuzzer(_ testOneInput: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32) -> Never {
    var argc = CommandLine.argc
    var argv = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv, testOneInput))
}
