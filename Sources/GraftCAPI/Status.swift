// The C ABI of include/graft.h: @_cdecl thunks that check C arguments, translate them into Graft's typed options,
// call the Graft module (GraftSession / GraftTrainingSession) and map every thrown GraftError onto a status code
// plus a thread-local message. No engine logic, defaults or validation live here. The header is imported as the
// module CGraftABI, so struct layouts, versions and the status table are the header's own.
//
// This file: versions, the status table, the thread-local last error and the entry-point guard.
import CGraftABI
import Foundation
import Graft
#if canImport(Glibc)
import Glibc
#endif

/// The thread-local message of the last failed call (a malloc'd C string, freed on replacement).
private let errorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { free($0) }
    return key
}()

/// A never-freed C string (static text handed out by the library).
func staticCString(_ s: String) -> UnsafePointer<CChar> {
    let bytes = Array(s.utf8CString)
    let p = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count)
    p.initialize(from: bytes, count: bytes.count)
    return UnsafePointer(p)
}

nonisolated(unsafe) private let emptyText = staticCString("")
nonisolated(unsafe) let versionText = staticCString(GraftVersion.string)
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
func guarded(_ body: () throws -> Void) -> graft_status {
    clearLastError()
    do {
        try body()
        return GRAFT_OK
    } catch let e as GraftError {
        setLastError(e.message)
        return e.code.rawValue
    } catch {
        setLastError("unexpected error: \(error)")
        return GraftError.Code.internalError.rawValue
    }
}

/// The C entry point `graft_version`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_version")
public func graft_version() -> UInt32 { UInt32(GraftVersion.major * 10000 + GraftVersion.minor * 100 + GraftVersion.patch) }

/// The C entry point `graft_version_string`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_version_string")
public func graft_version_string() -> UnsafePointer<CChar> { versionText }

/// The C entry point `graft_status_string`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_status_string")
public func graft_status_string(_ status: graft_status) -> UnsafePointer<CChar> {
    cgraft_status_description(status) ?? unknownStatusText
}

/// The C entry point `graft_status_name`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_status_name")
public func graft_status_name(_ status: graft_status) -> UnsafePointer<CChar>? { cgraft_status_name(status) }

/// The C entry point `graft_last_error`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_last_error")
public func graft_last_error() -> UnsafePointer<CChar> {
    guard let p = pthread_getspecific(errorKey) else { return emptyText }
    return UnsafePointer(p.assumingMemoryBound(to: CChar.self))
}

/// The C entry point `graft_string_free`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_string_free")
public func graft_string_free(_ s: UnsafeMutablePointer<CChar>?) { free(s) }
