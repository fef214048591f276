import Foundation
import Testing
import GraftAdapters
import GraftIO
import GraftTensor
import GraftTestSupport
@testable import GraftTrain

/// Checkpoints are saved as one unit and a directory mixing two saves is refused, never loaded.
/// (tests/crash kills a training process mid-save for the end-to-end check.)
@Suite(.serialized) struct CheckpointIntegrityTests {
    private func expectFormatError(_ mentions: [String], _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("expected a format error mentioning \(mentions)")
        } catch let e as GraftError {
            #expect(e.code == .format, "\(e.message)")
            for m in mentions { #expect(e.message.contains(m), "'\(e.message)' does not mention '\(m)'") }
        } catch {
            Issue.record("expected a GraftError, got \(error)")
        }
    }

    @Test func mixedAndIncompleteCheckpointsAreRefusedAndLeaveTheTrainerAlone() throws {
        var config = TrainerConfig()
        config.batchSize = 16
        config.epochs = 1
        let setup = try SentimentSetup(trainCount: 48)
        let trainer = try setup.trainer(config)
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("graft-ckpt-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        try trainer.train(setup.train) { p in p.step < 1 }
        try trainer.saveCheckpoint(directory: root + "/one")
        try trainer.train(setup.train) { p in p.step < 2 }
        try trainer.saveCheckpoint(directory: root + "/two")
        // Saving again over a checkpoint replaces the directory as a whole.
        try trainer.saveCheckpoint(directory: root + "/two")
        #expect(try FileManager.default.contentsOfDirectory(atPath: root).sorted() == ["one", "two"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: root + "/two").sorted()
                == (Trainer.checkpointFiles + [AtomicDirectory.manifestName]).sorted())
        #expect(try SavedDirectory(path: root + "/two").manifest?.metadata["global_step"] == "2")

        let fresh = try SentimentSetup(trainCount: 48).trainer(config)
        try fresh.loadCheckpoint(directory: root + "/one")
        #expect(fresh.globalStep == 1)
        // The optimizer state of step 2 beside the rest of step 1: refused, naming the file.
        let mixed = root + "/mixed"
        try FileManager.default.copyItem(atPath: root + "/one", toPath: mixed)
        try FileManager.default.removeItem(atPath: mixed + "/optimizer.safetensors")
        try FileManager.default.copyItem(atPath: root + "/two/optimizer.safetensors", toPath: mixed + "/optimizer.safetensors")
        expectFormatError([mixed + "/optimizer.safetensors", "mixes files of different saves"]) {
            try fresh.loadCheckpoint(directory: mixed)
        }
        #expect(fresh.globalStep == 1)
        // No manifest: not a complete checkpoint.
        try FileManager.default.removeItem(atPath: mixed + "/" + AtomicDirectory.manifestName)
        expectFormatError([AtomicDirectory.manifestName, "not a complete Graft checkpoint"]) {
            try fresh.loadCheckpoint(directory: mixed)
        }
        // A directory that does not exist.
        do {
            try fresh.loadCheckpoint(directory: root + "/absent")
            Issue.record("loading a missing checkpoint directory succeeded")
        } catch let e as GraftError {
            #expect(e.code == .notFound && e.message.contains(root + "/absent"), "\(e.message)")
        }
        // An adapter directory is not a checkpoint.
        try setup.model.saveAdapter("default", directory: root + "/adapter")
        expectFormatError(["holds a saved adapter, not a checkpoint"]) { try fresh.loadCheckpoint(directory: root + "/adapter") }
        #expect(fresh.globalStep == 1)
        // A checkpoint directory still loads as a PEFT adapter; a torn adapter file does not.
        let viewer = try SentimentSetup(trainCount: 1)
        try viewer.model.loadAdapter(directory: root + "/two", name: "ckpt")
        var weights = try readFile(root + "/adapter/adapter_model.safetensors")
        weights.removeLast(7)
        try Data(weights).write(to: URL(fileURLWithPath: root + "/adapter/adapter_model.safetensors"))
        expectFormatError([root + "/adapter/adapter_model.safetensors", "does not match"]) {
            try viewer.model.loadAdapter(directory: root + "/adapter", name: "torn")
        }
    }
}
