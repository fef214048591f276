// The C ABI of include/graft.h: @_cdecl thunks that check C arguments, convert them, call the Graft module
// (GraftSession / GraftTrainingSession) and map every thrown GraftError onto a status code plus a thread-local
// message. No engine logic lives here.
//
// The header is hand-written and is not a module-map input, so struct layouts are mirrored by byte offsets
// below; tests/c/test_capi.c pins the same offsets with _Static_assert.
import Foundation
import Graft
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Status, thread-local last error

private let versionMajor = GraftVersion.major, versionMinor = GraftVersion.minor, versionPatch = GraftVersion.patch

/// Every fallible entry point clears the message and maps a thrown error onto (code, message).
private let errorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { free($0) }
    return key
}()

/// A never-freed C string (static text handed out by the library).
private func staticCString(_ s: String) -> UnsafePointer<CChar> {
    let bytes = Array(s.utf8CString)
    let p = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count)
    p.initialize(from: bytes, count: bytes.count)
    return UnsafePointer(p)
}

nonisolated(unsafe) private let emptyText = staticCString("")
nonisolated(unsafe) private let versionText = staticCString("\(versionMajor).\(versionMinor).\(versionPatch)")
nonisolated(unsafe) private let statusTexts: [Int32: UnsafePointer<CChar>] = [
    0: staticCString("ok"), -1: staticCString("invalid argument"), -2: staticCString("i/o error"),
    -3: staticCString("malformed data"), -4: staticCString("unsupported"), -5: staticCString("not found"),
    -6: staticCString("out of memory"), -7: staticCString("invalid state (wrong call order)"),
    -8: staticCString("cancelled"), -9: staticCString("internal error"),
]
nonisolated(unsafe) private let unknownStatusText = staticCString("unknown status")

private func setLastError(_ message: String) {
    free(pthread_getspecific(errorKey))
    pthread_setspecific(errorKey, strdup(message.isEmpty ? "unknown error" : message))
}

private func clearLastError() {
    if let old = pthread_getspecific(errorKey) {
        free(old)
        pthread_setspecific(errorKey, nil)
    }
}

/// Runs an entry point: clears the thread's message, and turns any thrown error into its status code.
func guarded(_ body: () throws -> Void) -> Int32 {
    clearLastError()
    do {
        try body()
        return 0
    } catch let e as GraftError {
        setLastError(e.message)
        return e.code.rawValue
    } catch {
        setLastError("unexpected error: \(error)")
        return GraftError.Code.internalError.rawValue
    }
}

// MARK: - Argument conversion

private func invalid(_ message: String) -> GraftError { GraftError.invalid(message) }

func string(_ p: UnsafePointer<CChar>?, _ name: String) throws -> String {
    guard let p else { throw invalid("\(name) is NULL") }
    guard let s = String(validatingCString: p) else { throw invalid("\(name) is not valid UTF-8") }
    return s
}

func session(_ p: OpaquePointer?) throws -> GraftSession {
    guard let p else { throw invalid("model is NULL") }
    return Unmanaged<GraftSession>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

private func trainingSession(_ p: OpaquePointer?) throws -> GraftTrainingSession {
    guard let p else { throw invalid("trainer is NULL") }
    return Unmanaged<GraftTrainingSession>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

/// A malloc'd copy of `s` for the caller to release with graft_string_free.
func mallocString(_ s: String) throws -> UnsafeMutablePointer<CChar> {
    guard let p = strdup(s) else { throw GraftError(.outOfMemory, "cannot allocate \(s.utf8.count + 1) bytes for a result string") }
    return p
}

/// `count` Int32 values at `p`, which must not be NULL when `count > 0`.
private func int32s(_ p: UnsafePointer<Int32>?, count: Int, _ name: String) throws -> [Int32] {
    if count == 0 { return [] }
    guard let p else { throw invalid("\(name) is NULL but \(count) values are expected") }
    return Array(UnsafeBufferPointer(start: p, count: count))
}

/// The token batch of `ids[batch * stride]` + `lengths[batch]` (NULL = full rows), validated.
private func tokenBatch(_ s: GraftSession, _ ids: UnsafePointer<Int32>?, _ lengths: UnsafePointer<Int32>?,
                        _ batch: Int32, _ stride: Int32) throws -> TokenBatch {
    guard batch >= 1 else { throw invalid("batch must be ≥ 1, got \(batch)") }
    guard stride >= 1 else { throw invalid("stride must be ≥ 1, got \(stride)") }
    guard ids != nil else { throw invalid("ids is NULL") }
    let (n, overflow) = Int(batch).multipliedReportingOverflow(by: Int(stride))
    guard !overflow, n <= Int(Int32.max) else { throw invalid("batch × stride = \(batch) × \(stride) is too large") }
    let values = try int32s(ids, count: n, "ids")
    let lens = try lengths.map { try int32s($0, count: Int(batch), "lengths").map(Int.init) }
    return try s.tokenBatch(ids: values, lengths: lens, batch: Int(batch), stride: Int(stride))
}

/// Writes `values` to `out` when it fits; always reports the count (snprintf-style).
private func deliver<T>(_ values: [T], to out: UnsafeMutablePointer<T>?, capacity: Int,
                        count: UnsafeMutablePointer<Int>, what: String) throws {
    count.pointee = values.count
    guard capacity >= 0 else { throw invalid("\(what) capacity \(capacity) is negative") }
    guard capacity >= values.count else {
        throw invalid("\(what) capacity is \(capacity) but \(values.count) values are needed (the needed count was stored)")
    }
    guard values.count == 0 || out != nil else { throw invalid("\(what) buffer is NULL but \(values.count) values are needed") }
    if let out { for (i, v) in values.enumerated() { out[i] = v } }
}

// MARK: - Parameter structs by offset

/// Reads a caller's parameter struct by byte offset: fields beyond its struct_size take defaults; a larger
/// struct_size is accepted when the bytes this library does not know are zero.
private struct ParamsReader {
    let raw: UnsafeRawPointer?
    let size: Int

    init(_ p: UnsafeRawPointer?, known: Int, name: String) throws {
        raw = p
        guard let p else { size = 0; return }
        let declared = Int(p.loadUnaligned(as: UInt32.self))
        guard declared >= 8 else {
            throw invalid("\(name).struct_size is \(declared); it must be at least 8 (fill the struct with \(name)_init)")
        }
        guard declared <= 4096 else { throw invalid("\(name).struct_size is \(declared), which is implausibly large (fill the struct with \(name)_init)") }
        if declared > known {
            for i in known..<declared where p.load(fromByteOffset: i, as: UInt8.self) != 0 {
                throw invalid("\(name).struct_size is \(declared) but this library (\(String(cString: versionText))) knows \(known) bytes, and byte \(i) of the unknown tail is not zero (a field of a newer graft.h is set)")
            }
        }
        size = declared
    }

    func has(_ offset: Int, _ width: Int) -> Bool { raw != nil && offset + width <= size }
    func int32(_ offset: Int, _ fallback: Int32) -> Int32 {
        guard let raw, has(offset, 4) else { return fallback }
        return raw.loadUnaligned(fromByteOffset: offset, as: Int32.self)
    }
    func float(_ offset: Int, _ fallback: Float) -> Float {
        guard let raw, has(offset, 4) else { return fallback }
        return raw.loadUnaligned(fromByteOffset: offset, as: Float.self)
    }
    func uint64(_ offset: Int, _ fallback: UInt64) -> UInt64 {
        guard let raw, has(offset, 8) else { return fallback }
        return raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self)
    }
}

/// One field of a parameter struct: offset, width and its default as raw bytes.
private enum Field {
    case int32(Int, Int32), float(Int, Float), uint64(Int, UInt64)
}

/// Writes defaults for the fields within `size` bytes and zeroes the rest of the caller's struct.
private func initParams(_ p: UnsafeMutableRawPointer?, size: Int, known: Int, fields: [Field]) {
    guard let p, size >= 8 else { return }
    p.initializeMemory(as: UInt8.self, repeating: 0, count: size)
    p.storeBytes(of: UInt32(truncatingIfNeeded: size), as: UInt32.self)
    for f in fields {
        switch f {
        case .int32(let o, let v): if o + 4 <= size { p.storeBytes(of: v, toByteOffset: o, as: Int32.self) }
        case .float(let o, let v): if o + 4 <= size { p.storeBytes(of: v, toByteOffset: o, as: Float.self) }
        case .uint64(let o, let v): if o + 8 <= size { p.storeBytes(of: v, toByteOffset: o, as: UInt64.self) }
        }
    }
}

// graft_model_params: struct_size 0, num_threads 4, task 8, num_labels 12, seed 16; size 24.
private let modelParamsSize = 24
private let modelParamsDefaults: [Field] = [.int32(4, 0), .int32(8, 0), .int32(12, 2), .uint64(16, 0)]
// graft_sampling_params: max_new_tokens 4, temperature 8, top_p 12, top_k 16, stop_at_eos 20, seed 24; size 32.
private let samplingParamsSize = 32
private let samplingParamsDefaults: [Field] = [.int32(4, 128), .float(8, 0), .float(12, 1), .int32(16, 0), .int32(20, 1), .uint64(24, 0)]
// graft_trainer_params: learning_rate 4, weight_decay 8, warmup_steps 12, total_steps 16, schedule 20,
// optimizer 24, max_grad_norm 28, gradient_accumulation_steps 32, batch_size 36, seed 40, epochs 48,
// max_length 52; size 56.
private let trainerParamsSize = 56
private let trainerParamsDefaults: [Field] = [
    .float(4, 1e-3), .float(8, 0.01), .int32(12, 0), .int32(16, 0), .int32(20, 1), .int32(24, 0), .float(28, 1),
    .int32(32, 1), .int32(36, 32), .uint64(40, 42), .int32(48, 1), .int32(52, 64),
]
// graft_progress: step 4, total_steps 8, epoch 12, loss 16, learning_rate 20, grad_norm 24, mean_loss 28,
// tokens_per_second 32, elapsed_seconds 40, eta_seconds 48; size 56.
private let progressSize = 56

// MARK: - Version, status, strings

/// The C entry point `graft_version`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_version")
public func graft_version() -> UInt32 { UInt32(versionMajor * 10000 + versionMinor * 100 + versionPatch) }

/// The C entry point `graft_version_string`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_version_string")
public func graft_version_string() -> UnsafePointer<CChar> { versionText }

/// The C entry point `graft_status_string`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_status_string")
public func graft_status_string(_ status: Int32) -> UnsafePointer<CChar> { statusTexts[status] ?? unknownStatusText }

/// The C entry point `graft_last_error`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_last_error")
public func graft_last_error() -> UnsafePointer<CChar> {
    guard let p = pthread_getspecific(errorKey) else { return emptyText }
    return UnsafePointer(p.assumingMemoryBound(to: CChar.self))
}

/// The C entry point `graft_string_free`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_string_free")
public func graft_string_free(_ s: UnsafeMutablePointer<CChar>?) { free(s) }

// MARK: - Parameter initializers

/// The C entry point `graft_model_params_init_sized`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_params_init_sized")
public func graft_model_params_init_sized(_ p: UnsafeMutableRawPointer?, _ size: Int) {
    initParams(p, size: size, known: modelParamsSize, fields: modelParamsDefaults)
}

/// The C entry point `graft_sampling_params_init_sized`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_sampling_params_init_sized")
public func graft_sampling_params_init_sized(_ p: UnsafeMutableRawPointer?, _ size: Int) {
    initParams(p, size: size, known: samplingParamsSize, fields: samplingParamsDefaults)
}

/// The C entry point `graft_trainer_params_init_sized`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_params_init_sized")
public func graft_trainer_params_init_sized(_ p: UnsafeMutableRawPointer?, _ size: Int) {
    initParams(p, size: size, known: trainerParamsSize, fields: trainerParamsDefaults)
}

// MARK: - Models

/// The C entry point `graft_model_load`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_load")
public func graft_model_load(_ path: UnsafePointer<CChar>?, _ params: UnsafeRawPointer?,
                             _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        guard let out else { throw invalid("out is NULL") }
        let path = try string(path, "path")
        let r = try ParamsReader(params, known: modelParamsSize, name: "graft_model_params")
        let threads = r.int32(4, 0)
        guard threads >= 0 else { throw invalid("graft_model_params.num_threads must be ≥ 0, got \(threads)") }
        let taskValue = r.int32(8, 0)
        guard let task = SessionTask(rawValue: taskValue) else {
            throw invalid("graft_model_params.task is \(taskValue); expected GRAFT_TASK_BASE (0), GRAFT_TASK_SEQUENCE_CLASSIFICATION (1) or GRAFT_TASK_CAUSAL_LM (2)")
        }
        let labels = r.int32(12, 2)
        if task == .sequenceClassification, labels < 1 {
            throw invalid("graft_model_params.num_labels must be ≥ 1 for sequence classification, got \(labels)")
        }
        if threads > 0 { Threading.setThreads(Int(threads)) }
        let s = try GraftSession(path: path, task: task, numLabels: Int(labels), seed: r.uint64(16, 0))
        out.pointee = OpaquePointer(Unmanaged.passRetained(s).toOpaque())
    }
}

/// The C entry point `graft_model_free`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_free")
public func graft_model_free(_ model: OpaquePointer?) {
    guard let model else { return }
    Unmanaged<GraftSession>.fromOpaque(UnsafeRawPointer(model)).release()
}

/// The C entry point `graft_model_info`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_info")
public func graft_model_info(_ model: OpaquePointer?, _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    guarded {
        let s = try session(model)
        guard let json else { throw invalid("json is NULL") }
        json.pointee = try mallocString(try s.infoJSON())
    }
}

/// The C entry point `graft_tokenize`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_tokenize")
public func graft_tokenize(_ model: OpaquePointer?, _ text: UnsafePointer<CChar>?, _ addSpecial: Int32,
                           _ ids: UnsafeMutablePointer<Int32>?, _ capacity: Int,
                           _ needed: UnsafeMutablePointer<Int>?) -> Int32 {
    guarded {
        let s = try session(model)
        let text = try string(text, "text")
        guard let needed else { throw invalid("n_needed is NULL") }
        let tokens = s.model.tokenizer.encode(text, addSpecialTokens: addSpecial != 0)
        try deliver(tokens, to: ids, capacity: capacity, count: needed, what: "ids")
    }
}

/// The C entry point `graft_detokenize`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_detokenize")
public func graft_detokenize(_ model: OpaquePointer?, _ ids: UnsafePointer<Int32>?, _ n: Int, _ skipSpecial: Int32,
                             _ text: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    guarded {
        let s = try session(model)
        guard let text else { throw invalid("text is NULL") }
        guard n >= 0, n <= Int(Int32.max) else { throw invalid("n = \(n) is not a valid token count") }
        let values = try int32s(ids, count: n, "ids")
        text.pointee = try mallocString(s.model.tokenizer.decode(values, skipSpecialTokens: skipSpecial != 0))
    }
}

// MARK: - Adapters

/// The C entry point `graft_adapter_add`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_add")
public func graft_adapter_add(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ config: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let s = try session(model)
        try s.addAdapter(name: try string(name, "name"), configJSON: try string(config, "config_json"))
    }
}

/// The C entry point `graft_adapter_load`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_load")
public func graft_adapter_load(_ model: OpaquePointer?, _ directory: UnsafePointer<CChar>?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let s = try session(model)
        let dir = try string(directory, "directory")
        let adapterName = name == nil ? "default" : try string(name, "name")
        try s.adapted.loadAdapter(directory: dir, name: adapterName)
    }
}

/// The C entry point `graft_adapter_save`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_save")
public func graft_adapter_save(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ directory: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let s = try session(model)
        try s.adapted.saveAdapter(try string(name, "name"), directory: try string(directory, "directory"))
    }
}

/// The C entry point `graft_adapter_list`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_list")
public func graft_adapter_list(_ model: OpaquePointer?, _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    guarded {
        let s = try session(model)
        guard let json else { throw invalid("json is NULL") }
        json.pointee = try mallocString(try s.adapterListJSON())
    }
}

/// The C entry point `graft_adapter_set_active`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_set_active")
public func graft_adapter_set_active(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guarded { try session(model).adapted.setActiveAdapter(try string(name, "name")) }
}

/// The C entry point `graft_adapter_set_enabled`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_set_enabled")
public func graft_adapter_set_enabled(_ model: OpaquePointer?, _ enabled: Int32) -> Int32 {
    guarded { try session(model).adapted.setAdaptersDisabled(enabled == 0) }
}

/// The C entry point `graft_adapter_delete`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_delete")
public func graft_adapter_delete(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guarded { try session(model).deleteAdapter(name: try string(name, "name")) }
}

/// The C entry point `graft_adapter_merge`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_merge")
public func graft_adapter_merge(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guarded { try session(model).adapted.merge(try string(name, "name")) }
}

/// The C entry point `graft_adapter_unmerge`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_unmerge")
public func graft_adapter_unmerge(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guarded { try session(model).adapted.unmerge(try string(name, "name")) }
}

// MARK: - Inference

/// The C entry point `graft_model_forward`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_forward")
public func graft_model_forward(_ model: OpaquePointer?, _ ids: UnsafePointer<Int32>?, _ lengths: UnsafePointer<Int32>?,
                                _ batch: Int32, _ stride: Int32, _ adapterIds: UnsafePointer<Int32>?, _ output: Int32,
                                _ out: UnsafeMutablePointer<Float>?, _ capacity: Int,
                                _ outCount: UnsafeMutablePointer<Int>?) -> Int32 {
    guarded {
        let s = try session(model)
        guard let outCount else { throw invalid("out_count is NULL") }
        guard let kind = SessionOutput(rawValue: output) else {
            throw invalid("output is \(output); expected GRAFT_OUTPUT_HIDDEN (1) or GRAFT_OUTPUT_LOGITS (2)")
        }
        let tokens = try tokenBatch(s, ids, lengths, batch, stride)
        let needed = try s.outputCount(batch: Int(batch), stride: Int(stride), output: kind)
        outCount.pointee = needed
        guard capacity >= needed else {
            throw invalid("out_capacity is \(capacity) but the output has \(needed) floats (stored in *out_count)")
        }
        guard out != nil else { throw invalid("out is NULL but the output has \(needed) floats") }
        let perRow = try adapterIds.map { try int32s($0, count: Int(batch), "adapter_ids") }
        let values = try s.forward(batch: tokens, adapterIds: perRow, output: kind)
        try deliver(values, to: out, capacity: capacity, count: outCount, what: "out")
    }
}

/// The C entry point `graft_generate`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_generate")
public func graft_generate(_ model: OpaquePointer?, _ prompt: UnsafePointer<Int32>?, _ n: Int, _ params: UnsafeRawPointer?,
                           _ callback: (@convention(c) (Int32, UnsafePointer<CChar>?, UnsafeMutableRawPointer?) -> Int32)?,
                           _ userData: UnsafeMutableRawPointer?, _ out: UnsafeMutablePointer<Int32>?, _ capacity: Int,
                           _ nOut: UnsafeMutablePointer<Int>?) -> Int32 {
    guarded {
        let s = try session(model)
        guard prompt != nil else { throw invalid("prompt is NULL") }
        guard n >= 1, n <= Int(Int32.max) else { throw invalid("prompt length n must be ≥ 1, got \(n)") }
        let ids = try int32s(prompt, count: n, "prompt")
        let r = try ParamsReader(params, known: samplingParamsSize, name: "graft_sampling_params")
        let maxNew = r.int32(4, 128), temperature = r.float(8, 0), topP = r.float(12, 1), topK = r.int32(16, 0)
        guard maxNew >= 0 else { throw invalid("graft_sampling_params.max_new_tokens must be ≥ 0, got \(maxNew)") }
        guard temperature >= 0, temperature.isFinite else { throw invalid("graft_sampling_params.temperature must be ≥ 0, got \(temperature)") }
        guard topP > 0, topP <= 1 else { throw invalid("graft_sampling_params.top_p must be in (0, 1], got \(topP)") }
        guard topK >= 0 else { throw invalid("graft_sampling_params.top_k must be ≥ 0, got \(topK)") }
        guard capacity >= 0 else { throw invalid("capacity \(capacity) is negative") }
        if out != nil, capacity < Int(maxNew) {
            throw invalid("capacity is \(capacity) but max_new_tokens is \(maxNew); give room for max_new_tokens ids or pass out = NULL")
        }
        if out == nil, capacity != 0 { throw invalid("out is NULL but capacity is \(capacity)") }
        let parameters = GenerationParameters(maxNewTokens: Int(maxNew), temperature: temperature, topP: topP,
                                              topK: Int(topK), seed: r.uint64(24, 0))
        let generated = try s.generate(prompt: ids, parameters: parameters, stopAtEOS: r.int32(20, 1) != 0) { token, piece in
            guard let callback else { return true }
            return piece.withCString { callback(token, $0, userData) } == 0
        }
        if let out { for (i, v) in generated.enumerated() { out[i] = v } }
        nOut?.pointee = generated.count
    }
}

// MARK: - Training

/// The C entry point `graft_trainer_create`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_create")
public func graft_trainer_create(_ model: OpaquePointer?, _ adapterName: UnsafePointer<CChar>?, _ params: UnsafeRawPointer?,
                                 _ extrasJSON: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        let s = try session(model)
        guard let out else { throw invalid("out is NULL") }
        let name = adapterName == nil ? nil : try string(adapterName, "adapter_name")
        let r = try ParamsReader(params, known: trainerParamsSize, name: "graft_trainer_params")
        var c = TrainerConfig()
        c.learningRate = r.float(4, 1e-3)
        c.weightDecay = r.float(8, 0.01)
        c.warmupSteps = Int(r.int32(12, 0))
        let totalSteps = Int(r.int32(16, 0))
        let scheduleValue = r.int32(20, 1)
        let kinds: [Int32: LearningRateSchedule.Kind] = [0: .constant, 1: .linear, 2: .cosine]
        guard let kind = kinds[scheduleValue] else {
            throw invalid("graft_trainer_params.schedule is \(scheduleValue); expected GRAFT_SCHEDULE_CONSTANT (0), _LINEAR (1) or _COSINE (2)")
        }
        c.schedule = kind
        let optimizerValue = r.int32(24, 0)
        switch optimizerValue {
        case 0: c.optimizer = .adamw
        case 1: c.optimizer = .sgd
        default: throw invalid("graft_trainer_params.optimizer is \(optimizerValue); expected GRAFT_OPTIMIZER_ADAMW (0) or GRAFT_OPTIMIZER_SGD (1)")
        }
        let clip = r.float(28, 1)
        guard clip >= 0, clip.isFinite else { throw invalid("graft_trainer_params.max_grad_norm must be ≥ 0 (0 = off), got \(clip)") }
        c.maxGradNorm = clip > 0 ? clip : nil
        c.gradientAccumulationSteps = Int(r.int32(32, 1))
        c.batchSize = Int(r.int32(36, 32))
        c.seed = r.uint64(40, 42)
        c.epochs = Int(r.int32(48, 1))
        let maxLength = Int(r.int32(52, 64))
        do {
            try c.validate()
        } catch let e as GraftError {
            throw GraftError(e.code, "graft_trainer_params: \(e.message)")
        }
        var extras: [String: Any] = [:]
        if extrasJSON != nil {
            let text = try string(extrasJSON, "extras_json")
            let value: Any
            do { value = try JSONSerialization.jsonObject(with: Data(text.utf8)) } catch {
                throw invalid("extras_json is not valid JSON (\(error.localizedDescription))")
            }
            guard let object = value as? [String: Any] else { throw invalid("extras_json must be a JSON object") }
            extras = object
        }
        let t = try GraftTrainingSession(session: s, adapterName: name, config: c, totalSteps: totalSteps,
                                         maxLength: maxLength, extras: extras)
        out.pointee = OpaquePointer(Unmanaged.passRetained(t).toOpaque())
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
    let count = t.session.classifier != nil ? Int(batch) : Int(batch) * Int(stride)
    return try int32s(p, count: count, "labels")
}

/// The C entry point `graft_trainer_step`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_step")
public func graft_trainer_step(_ trainer: OpaquePointer?, _ ids: UnsafePointer<Int32>?, _ lengths: UnsafePointer<Int32>?,
                               _ batch: Int32, _ stride: Int32, _ labelsPointer: UnsafePointer<Int32>?,
                               _ loss: UnsafeMutablePointer<Float>?) -> Int32 {
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
                                   _ loss: UnsafeMutablePointer<Float>?, _ accuracy: UnsafeMutablePointer<Float>?) -> Int32 {
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
                                     _ callback: (@convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?) -> Int32)?,
                                     _ userData: UnsafeMutableRawPointer?) -> Int32 {
    guarded {
        let t = try trainingSession(trainer)
        let path = try string(data, "data")
        let record = UnsafeMutableRawPointer.allocate(byteCount: progressSize, alignment: 8)
        defer { record.deallocate() }
        try t.train(file: path) { p in
            guard let callback else { return true }
            record.initializeMemory(as: UInt8.self, repeating: 0, count: progressSize)
            record.storeBytes(of: UInt32(progressSize), as: UInt32.self)
            record.storeBytes(of: Int32(clamping: p.step), toByteOffset: 4, as: Int32.self)
            record.storeBytes(of: Int32(clamping: p.totalSteps), toByteOffset: 8, as: Int32.self)
            record.storeBytes(of: Int32(clamping: p.epoch), toByteOffset: 12, as: Int32.self)
            record.storeBytes(of: p.loss, toByteOffset: 16, as: Float.self)
            record.storeBytes(of: p.learningRate, toByteOffset: 20, as: Float.self)
            record.storeBytes(of: p.gradNorm, toByteOffset: 24, as: Float.self)
            record.storeBytes(of: p.meanLoss, toByteOffset: 28, as: Float.self)
            record.storeBytes(of: p.tokensPerSecond, toByteOffset: 32, as: Double.self)
            record.storeBytes(of: p.elapsed, toByteOffset: 40, as: Double.self)
            record.storeBytes(of: p.eta, toByteOffset: 48, as: Double.self)
            return callback(UnsafeRawPointer(record), userData) == 0
        }
    }
}

/// The C entry point `graft_trainer_save_checkpoint`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_save_checkpoint")
public func graft_trainer_save_checkpoint(_ trainer: OpaquePointer?, _ directory: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let t = try trainingSession(trainer)
        let dir = try string(directory, "directory")
        try t.prepare()
        try t.trainer.saveCheckpoint(directory: dir)
    }
}

/// The C entry point `graft_trainer_load_checkpoint`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_load_checkpoint")
public func graft_trainer_load_checkpoint(_ trainer: OpaquePointer?, _ directory: UnsafePointer<CChar>?) -> Int32 {
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
