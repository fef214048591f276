// The C ABI: trainers (create, step, evaluate, train over a file, checkpoints).
import CGraftABI
import Foundation
import Graft
import GraftAssets

/// The C entry point `graft_trainer_create`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_create")
public func graft_trainer_create(_ model: OpaquePointer?, _ adapterName: UnsafePointer<CChar>?,
                                 _ params: UnsafePointer<graft_trainer_params>?, _ extrasJSON: UnsafePointer<CChar>?,
                                 _ out: UnsafeMutablePointer<OpaquePointer?>?) -> graft_status {
    guarded {
        let s = try session(model)
        guard let out else { throw invalid("out is NULL") }
        let name = adapterName == nil ? nil : try string(adapterName, "adapter_name")
        let extras = extrasJSON == nil ? nil : try string(extrasJSON, "extras_json")
        let fields = try readParams(params, defaults: graft_trainer_params(TrainingOptions()), name: "graft_trainer_params")
        let t = try GraftTrainingSession(session: s, adapterName: name, options: try fields.options(extras: extras))
        out.pointee = OpaquePointer(Unmanaged.passRetained(t).toOpaque())
    }
}

/// The C entry point `graft_trainer_options`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_options")
public func graft_trainer_options(_ trainer: OpaquePointer?, _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> graft_status {
    guarded {
        let t = try trainingSession(trainer)
        guard let json else { throw invalid("json is NULL") }
        json.pointee = try mallocString(t.options.json)
    }
}

/// The C entry point `graft_trainer_world`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_world")
public func graft_trainer_world(_ trainer: OpaquePointer?, _ rank: UnsafeMutablePointer<Int32>?,
                                _ size: UnsafeMutablePointer<Int32>?) -> graft_status {
    guarded {
        let t = try trainingSession(trainer)
        rank?.pointee = Int32(t.rank)
        size?.pointee = Int32(t.worldSize)
    }
}

/// The C entry point `graft_trainer_free`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_free")
public func graft_trainer_free(_ trainer: OpaquePointer?) {
    guard let trainer else { return }
    let t = Unmanaged<GraftTrainingSession>.fromOpaque(UnsafeRawPointer(trainer))
    t.takeUnretainedValue().release()
    t.release()
}

/// Labels for a batch: one per row (classification) or `batch * stride` (causal LM, NULL allowed).
private func labels(_ t: GraftTrainingSession, _ p: UnsafePointer<Int32>?, batch: Int32, stride: Int32) throws -> [Int32]? {
    guard let p else { return nil }
    let count = t.session.task == .sequenceClassification ? Int(batch) : Int(batch) * Int(stride)
    return try int32s(p, count: count, "labels")
}

/// The C entry point `graft_trainer_step`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_step")
public func graft_trainer_step(_ trainer: OpaquePointer?, _ ids: UnsafePointer<Int32>?, _ lengths: UnsafePointer<Int32>?,
                               _ batch: Int32, _ stride: Int32, _ labelsPointer: UnsafePointer<Int32>?,
                               _ loss: UnsafeMutablePointer<Float>?) -> graft_status {
    guarded {
        let t = try trainingSession(trainer)
        let tokens = try tokenBatch(t.session, ids, lengths, batch, stride)
        let examples = try t.examples(batch: tokens, labels: try labels(t, labelsPointer, batch: batch, stride: stride))
        let value = try t.step(examples)
        loss?.pointee = value
    }
}

/// The C entry point `graft_trainer_evaluate`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_evaluate")
public func graft_trainer_evaluate(_ trainer: OpaquePointer?, _ ids: UnsafePointer<Int32>?, _ lengths: UnsafePointer<Int32>?,
                                   _ batch: Int32, _ stride: Int32, _ labelsPointer: UnsafePointer<Int32>?,
                                   _ loss: UnsafeMutablePointer<Float>?, _ accuracy: UnsafeMutablePointer<Float>?) -> graft_status {
    guarded {
        let t = try trainingSession(trainer)
        let tokens = try tokenBatch(t.session, ids, lengths, batch, stride)
        let examples = try t.examples(batch: tokens, labels: try labels(t, labelsPointer, batch: batch, stride: stride))
        let m = try t.evaluate(examples)
        loss?.pointee = Float(m.loss)
        accuracy?.pointee = Float(m.accuracy)
    }
}

/// The C entry point `graft_trainer_train_file`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_train_file")
public func graft_trainer_train_file(_ trainer: OpaquePointer?, _ data: UnsafePointer<CChar>?,
                                     _ callback: graft_progress_callback?, _ userData: UnsafeMutableRawPointer?) -> graft_status {
    guarded {
        let t = try trainingSession(trainer)
        let path = try string(data, "data")
        let examples = path == AssetCache.tweetsDataName
            ? try t.tokenize(try AssetCache.tweets(for: t.session.task).train) : try t.loadExamples(path)
        try t.train(examples) { p in
            guard let callback else { return true }
            var record = graft_progress()
            record.struct_size = UInt32(MemoryLayout<graft_progress>.size)
            record.step = Int32(clamping: p.step)
            record.total_steps = Int32(clamping: p.totalSteps)
            record.epoch = Int32(clamping: p.epoch)
            record.loss = p.loss
            record.learning_rate = p.learningRate
            record.grad_norm = p.gradNorm
            record.mean_loss = p.meanLoss
            record.tokens_per_second = p.tokensPerSecond
            record.elapsed_seconds = p.elapsed
            record.eta_seconds = p.eta
            return callback(&record, userData) == 0
        }
    }
}

/// The C entry point `graft_trainer_save_checkpoint`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_save_checkpoint")
public func graft_trainer_save_checkpoint(_ trainer: OpaquePointer?, _ directory: UnsafePointer<CChar>?) -> graft_status {
    guarded {
        let t = try trainingSession(trainer)
        let dir = try string(directory, "directory")
        try t.prepare()
        try t.trainer.saveCheckpoint(directory: dir)
    }
}

/// The C entry point `graft_trainer_load_checkpoint`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_load_checkpoint")
public func graft_trainer_load_checkpoint(_ trainer: OpaquePointer?, _ directory: UnsafePointer<CChar>?) -> graft_status {
    guarded {
        let t = try trainingSession(trainer)
        let dir = try string(directory, "directory")
        try t.prepare()
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw GraftError(.notFound, "\(dir): no such checkpoint directory")
        }
        try t.trainer.loadCheckpoint(directory: dir)
    }
}
