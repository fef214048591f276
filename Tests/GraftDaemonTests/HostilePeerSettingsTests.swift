import Foundation
import Testing

@testable import GraftDaemon

@Suite struct HostilePeerSettingsTests {
    private func configuration() -> DaemonConfiguration {
        var c = DaemonConfiguration()
        c.socketPath = "graftd.sock"
        return c
    }

    @Test func defaultsAreFiniteAndValid() throws {
        let c = configuration()
        #expect(c.frameTimeout == 30 && c.helloTimeout == 10 && c.maxConnections == 256)
        try c.validate()
    }

    @Test func rejectsTimeoutsAndLimitsOutOfRangeNamingTheFlag() {
        for (frame, hello) in [(-1.0, 10.0), (30, .nan), (.infinity, 10), (30, 100_000)] {
            var c = configuration()
            c.frameTimeout = frame
            c.helloTimeout = hello
            #expect(throws: (any Error).self) { try c.validate() }
        }
        var c = configuration()
        c.frameTimeout = 0  // no limit
        c.helloTimeout = 0.5
        #expect((try? c.validate()) != nil)
        c.maxConnections = 0
        do {
            try c.validate()
            Issue.record("max connections 0 was accepted")
        } catch {
            #expect("\(error)".contains("--max-connections"))
        }
    }

    @Test func secondsToMillisecondsRoundsUpAndZeroMeansNoLimit() {
        #expect(Daemon.milliseconds(0) == nil)
        #expect(Daemon.milliseconds(2) == 2000)
        #expect(Daemon.milliseconds(0.0005) == 1)
        #expect(Daemon.seconds(2) == "2" && Daemon.seconds(0.5) == "0.5")
    }
}

@Suite struct ClientPathTests {
    @Test func relativePathsResolveAgainstTheWorkingDirectory() {
        let p = ClientPath("out/../lora", field: "save_adapter.path", workingDirectory: "/srv/graft")
        #expect(p.resolved == "/srv/graft/lora" && p.base == "/srv/graft")
        #expect(p.explanation == "save_adapter.path 'out/../lora' resolved against graftd's working directory /srv/graft as /srv/graft/lora")
        let a = ClientPath("/data/x.jsonl", field: "start_training.data", workingDirectory: "/srv/graft")
        #expect(a.resolved == "/data/x.jsonl" && a.base == nil)
    }

    @Test func fileErrorsOfRelativePathsNameTheDirectory() {
        let p = ClientPath("missing", field: "load_adapter.path", workingDirectory: "/nonexistent-graft-dir")
        #expect(throws: (any Error).self) { try p.mustExist("adapter directory") }
        do {
            try p.mustExist("adapter directory")
        } catch {
            #expect("\(error)".contains("/nonexistent-graft-dir/missing") && "\(error)".contains("working directory /nonexistent-graft-dir"))
        }
    }
}

/// `Generate.fast_decode` (field 11, graft.h 0.5.0) survives the wire and selects the fast mode; left unset it
/// keeps the exact mode, and an older client's message (no field 11) decodes as before.
@Suite struct GenerateFastDecodeTests {
    @Test func fastDecodeCrossesTheWire() throws {
        var request = Graft_V1_Generate()
        request.promptIds = [1, 2, 3]
        request.fastDecode = true
        let bytes: [UInt8] = try request.serializedBytes()
        let decoded = try Graft_V1_Generate(serializedBytes: bytes)
        let options = try Engine.samplingOptions(decoded)
        #expect(decoded.fastDecode && options.fastDecode)
        request.fastDecode = false
        let plain: [UInt8] = try request.serializedBytes()
        #expect(!plain.contains(11 << 3))
        let exact = try Engine.samplingOptions(Graft_V1_Generate(serializedBytes: plain))
        #expect(!exact.fastDecode)
    }
}
