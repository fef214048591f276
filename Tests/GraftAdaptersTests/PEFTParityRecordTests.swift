import Foundation
import Testing
@testable import GraftAdapters
import GraftTestSupport

/// `graft methods` prints each method's PEFT parity from ``PEFTParity/records``; these tests keep that column
/// honest: every method has a record, and a "yes" names only fixtures that a parity test in this target measures.
@Suite struct PEFTParityRecordTests {
    /// The fixtures the parity suites load and compare with PEFT's output, each at the catalog's tolerance.
    static var measuredFixtures: Set<String> {
        Set(LoRAParityTests.encoderFixtures.map { "peft-minilm/\($0)" }
            + MethodParityTests.methods.map { "peft-minilm/\($0)" }
            + Wave2ParityTests.methods.map { "peft-minilm-wave2/\($0)" }
            + LoRAOptionTests.fixtures.map { "peft-minilm-lora-options/\($0)" }
            + DecoderMethodParityTests.methods.map { "peft-smollm2-decoder/\($0)" }
            // ALoRATests and LayerReplicationTests, at the catalog's 1e-4 max-abs (1e-5 relative past a change of 10)
            + ["peft-smollm2-lora-options/alora", "peft-smollm2-lora-options/lora_layer_replication"]
            + OSFParityTests.fixtures.map { "peft-minilm-osf/\($0)" }
            + xloraFixtures)
    }

    /// X-LoRA's fixtures, measured by `XLoRATests.logitsAndScalingsMatchPEFT` in GraftRoutingTests (X-LoRA lives
    /// in GraftRouting), at the catalog's tolerance.
    static let xloraFixtures = ["peft-xlora/smollm2/layerwise", "peft-xlora/smollm2/deep_topk"]

    @Test func xloraFixturesExist() {
        for f in Self.xloraFixtures {
            #expect(FileManager.default.fileExists(atPath: Assets.fixture(f + "/expected.safetensors")), "\(f)")
        }
    }

    @Test func everyBuiltInMethodHasARecord() {
        let missing = AdapterMethodTable.builtIn.knownTypes.filter { PEFTParity.records[$0] == nil }
        #expect(missing.isEmpty, "methods without a PEFT parity record: \(missing)")
    }

    @Test func aYesNamesOnlyMeasuredFixtures() {
        for (type, record) in PEFTParity.records {
            guard case .matches(let fixtures) = record else { continue }
            #expect(!fixtures.isEmpty, "\(type) claims parity on no fixture")
            for fixture in fixtures {
                #expect(Self.measuredFixtures.contains(fixture), "\(type) claims parity on \(fixture), which no parity test measures")
            }
        }
    }

    @Test func everyMeasuredFixtureIsClaimed() {
        let claimed = Set(PEFTParity.records.values.flatMap { record -> [String] in
            switch record {
            case .matches(let fixtures): fixtures
            case .withinConditioning(let fixture, _): [fixture]
            default: []
            }
        })
        #expect(Self.measuredFixtures.subtracting(claimed).isEmpty,
                "measured but not recorded: \(Self.measuredFixtures.subtracting(claimed).sorted())")
    }

    @Test func randLoRAIsNotClaimedExact() {
        #expect(!PEFTParity.record(for: "RANDLORA").isExact)
        #expect(PEFTParity.record(for: "randlora").summary == "conditioned")
        #expect(PEFTParity.record(for: "NO_SUCH_METHOD").summary == "no")
    }
}
