// The C ABI's argument conversion: C strings, handles, arrays and token batches, checked and named in errors.
import CGraftABI
import Foundation
import Graft
#if canImport(Glibc)
import Glibc
#endif

/// `GraftError.invalid(message)`.
func invalid(_ message: String) -> GraftError { GraftError.invalid(message) }

/// A NUL-terminated UTF-8 argument called `name`.
func string(_ p: UnsafePointer<CChar>?, _ name: String) throws -> String {
    guard let p else { throw invalid("\(name) is NULL") }
    guard let s = String(validatingCString: p) else { throw invalid("\(name) is not valid UTF-8") }
    return s
}

/// The session behind a `graft_model *`.
func session(_ p: OpaquePointer?) throws -> GraftSession {
    guard let p else { throw invalid("model is NULL") }
    return Unmanaged<GraftSession>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

/// The training session behind a `graft_trainer *`.
func trainingSession(_ p: OpaquePointer?) throws -> GraftTrainingSession {
    guard let p else { throw invalid("trainer is NULL") }
    return Unmanaged<GraftTrainingSession>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

/// A malloc'd copy of `s` for the caller to release with graft_string_free.
func mallocString(_ s: String) throws -> UnsafeMutablePointer<CChar> {
    guard let p = strdup(s) else { throw GraftError(.outOfMemory, "cannot allocate \(s.utf8.count + 1) bytes for a result string") }
    return p
}

/// `count` Int32 values at `p`, which must not be NULL when `count > 0`.
func int32s(_ p: UnsafePointer<Int32>?, count: Int, _ name: String) throws -> [Int32] {
    if count == 0 { return [] }
    guard let p else { throw invalid("\(name) is NULL but \(count) values are expected") }
    return Array(UnsafeBufferPointer(start: p, count: count))
}

/// The token batch of `ids[batch * stride]` + `lengths[batch]` (NULL = full rows), validated.
func tokenBatch(_ s: GraftSession, _ ids: UnsafePointer<Int32>?, _ lengths: UnsafePointer<Int32>?,
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
func deliver<T>(_ values: [T], to out: UnsafeMutablePointer<T>?, capacity: Int,
                count: UnsafeMutablePointer<Int>, what: String) throws {
    count.pointee = values.count
    guard capacity >= 0 else { throw invalid("\(what) capacity \(capacity) is negative") }
    guard capacity >= values.count else {
        throw invalid("\(what) capacity is \(capacity) but \(values.count) values are needed (the needed count was stored)")
    }
    guard values.count == 0 || out != nil else { throw invalid("\(what) buffer is NULL but \(values.count) values are needed") }
    if let out { for (i, v) in values.enumerated() { out[i] = v } }
}
