// swift-tools-version:6.0
// Graft: parameter-efficient fine-tuning on the CPU. See DESIGN notes in README.md for the module layout.
import PackageDescription
import Foundation

let package = Package(
    name: "Graft",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "Graft", targets: ["Graft", "GraftAssets"]),
        .executable(name: "graft", targets: ["graft"]),
        // The C ABI (include/graft.h) with the Swift runtime linked statically, so C hosts need no toolchain.
        // Named GraftCAPI because the CLI already owns the product name "graft"; `make lib` publishes the file
        // as .build/release/libgraft.so (its soname is already libgraft.so).
        .library(name: "GraftCAPI", type: .dynamic, targets: ["GraftCAPI"]),
        .executable(name: "graftd", targets: ["graftd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        // The daemon's codec; the generated code (Sources/GraftDaemon/Generated) is committed, see proto/README.md.
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    ],
    targets: [
        .systemLibrary(name: "CGraftSystem", path: "Sources/CGraftSystem"),
        // include/graft.h as a module: struct layouts, versions and the status table come from the header itself.
        .systemLibrary(name: "CGraftABI", path: "Sources/CGraftABI"),
        // Kernels that need CPU intrinsics or oneDNN (bfloat16), selected at run time.
        .target(name: "CGraftKernels", linkerSettings: [.linkedLibrary("dnnl"), .linkedLibrary("gomp"), .linkedLibrary("dl")]),
        // The worker pool behind parallelFor: workers that poll briefly between jobs instead of sleeping.
        .target(name: "CGraftThreads", cSettings: [.unsafeFlags(["-Wall", "-Wextra", "-Werror"])],
                linkerSettings: [.linkedLibrary("pthread")]),
        .target(name: "GraftTensor", dependencies: ["CGraftSystem", "CGraftABI", "CGraftKernels", "CGraftThreads"]),
        // Open MPI loaded with dlopen only under mpirun: nothing links libmpi, no MPI headers at build time.
        .target(name: "CGraftMPI", cSettings: [.unsafeFlags(["-Wall", "-Wextra", "-Werror"])],
                linkerSettings: [.linkedLibrary("dl")]),
        .target(name: "GraftDistributed", dependencies: ["GraftTensor", "CGraftMPI"]),
        .target(name: "GraftIO", dependencies: ["CGraftSystem", "GraftTensor"]),
        .target(name: "GraftText", dependencies: ["GraftIO"]),
        .target(name: "GraftModels", dependencies: ["GraftTensor", "GraftIO", "GraftText"]),
        .target(name: "GraftAdapters", dependencies: ["GraftTensor", "GraftIO", "GraftModels"]),
        .target(name: "GraftRouting", dependencies: ["GraftTensor", "GraftModels", "GraftAdapters", "GraftTrain"]),
        .target(name: "GraftTrain", dependencies: ["GraftTensor", "GraftIO", "GraftText", "GraftModels", "GraftAdapters", "GraftDistributed"]),
        .target(name: "Graft", dependencies: ["CGraftABI", "GraftDistributed", "GraftTensor", "GraftIO", "GraftText", "GraftModels", "GraftAdapters", "GraftRouting", "GraftTrain"]),
        // The asset cache's names (minilm, smollm2, tweets): a front-door convenience kept out of the core.
        .target(name: "GraftAssets", dependencies: ["Graft"]),
        .target(name: "GraftCAPI", dependencies: ["Graft", "GraftAssets", "CGraftABI"], exclude: ["exports.map"],
                linkerSettings: [.unsafeFlags([
                    "-static-stdlib", "-Xlinker", "-soname=libgraft.so",
                    // -static-stdlib alone leaves Foundation's own static dependencies unresolved in a .so.
                    "-Xlinker", "--start-group",
                    "-Xlinker", "-lFoundation", "-Xlinker", "-lFoundationEssentials",
                    "-Xlinker", "-lFoundationInternationalization", "-Xlinker", "-lCoreFoundation",
                    "-Xlinker", "-l_FoundationICU", "-Xlinker", "-l_FoundationCollections",
                    "-Xlinker", "-l_FoundationCShims", "-Xlinker", "-lswiftSynchronization",
                    "-Xlinker", "-lswiftDispatch", "-Xlinker", "-ldispatch", "-Xlinker", "-lBlocksRuntime",
                    "-Xlinker", "--end-group",
                    // Export only the graft_* functions: the Swift runtime and modules stay private.
                    "-Xlinker", "--version-script=Sources/GraftCAPI/exports.map",
                ])]),
        .systemLibrary(name: "CGraftUV", path: "Sources/CGraftUV"),
        .target(name: "GraftDaemon", dependencies: [
            "Graft", "GraftAssets", "CGraftUV", .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        .executableTarget(name: "graftd", dependencies: [
            "GraftDaemon", "CGraftSystem", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "graft", dependencies: [
            "Graft", "GraftAssets", "CGraftSystem", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .target(name: "GraftTestSupport", dependencies: ["GraftTensor", "GraftIO", "GraftText", "GraftModels", "GraftTrain"], path: "Tests/GraftTestSupport"),
        .testTarget(name: "GraftTensorTests", dependencies: ["GraftTensor", "GraftTestSupport"]),
        .testTarget(name: "GraftIOTests", dependencies: ["GraftIO", "GraftTestSupport"]),
        .testTarget(name: "GraftTextTests", dependencies: ["GraftText", "GraftIO"]),
        .testTarget(name: "GraftModelsTests", dependencies: ["GraftModels", "GraftIO", "GraftTensor", "GraftTestSupport"]),
        .testTarget(name: "GraftTests", dependencies: ["Graft", "GraftTestSupport"]),
        .testTarget(name: "GraftAdaptersTests", dependencies: ["GraftAdapters", "Graft", "GraftTestSupport"]),
        .testTarget(name: "GraftRoutingTests", dependencies: ["GraftRouting", "Graft", "GraftTestSupport"]),
        .testTarget(name: "GraftDistributedTests", dependencies: ["GraftDistributed", "GraftTestSupport"]),
        .testTarget(name: "GraftTrainTests", dependencies: ["GraftTrain", "Graft", "GraftTestSupport"]),
        .testTarget(name: "GraftDaemonTests", dependencies: ["GraftDaemon", "GraftTestSupport"]),
        // What each fuzz target runs on one input; the test replays the committed corpora and crashers through it.
        .target(name: "GraftFuzzHarness", dependencies: [
            "GraftIO", "GraftText", "GraftModels", "GraftAdapters", "GraftDaemon",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ], path: "Fuzz/Sources/GraftFuzzHarness"),
        .testTarget(name: "GraftFuzzRegressionTests", dependencies: ["GraftFuzzHarness"], path: "Fuzz/Tests"),
    ],
    swiftLanguageModes: [.v6]
)

// The libFuzzer executables (README "Fuzzing"), declared only when GRAFT_FUZZ is set so `swift build` and `make test`
// never build them. scripts/fuzz builds them with `GRAFT_FUZZ=1 swift build --scratch-path .build-fuzz
// -Xswiftc -sanitize=fuzzer,address`; each defines LLVMFuzzerTestOneInput and a main that runs libFuzzer's driver.
if ProcessInfo.processInfo.environment["GRAFT_FUZZ"] != nil {
    // The driver calls into libFuzzer's runtime, which only a -sanitize=fuzzer link provides.
    package.targets.append(.target(name: "GraftFuzzDriver", path: "Fuzz/Sources/GraftFuzzDriver"))
    for name in ["FuzzSafeTensors", "FuzzGGUF", "FuzzAdapterConfig", "FuzzFrame", "FuzzTokenizer"] {
        package.targets.append(.executableTarget(name: name, dependencies: ["GraftFuzzHarness", "GraftFuzzDriver"], path: "Fuzz/Sources/\(name)",
                                                 swiftSettings: [.unsafeFlags(["-parse-as-library"])]))
    }
}
