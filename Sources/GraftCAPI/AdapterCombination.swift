// The C ABI: combining adapters (PEFT's add_weighted_adapter) and saving a model with an adapter merged in.
import CGraftABI
import Graft

/// The C entry point `graft_adapter_combine`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_combine")
public func graft_adapter_combine(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?,
                                  _ adapters: UnsafePointer<UnsafePointer<CChar>?>?, _ weights: UnsafePointer<Double>?,
                                  _ count: Int, _ options: UnsafePointer<CChar>?,
                                  _ report: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> graft_status {
    guarded {
        let s = try session(model)
        let newName = try string(name, "name")
        // More adapters than any model holds is a caller's mistake (or garbage), not a request to honour.
        guard count >= 1, count <= 1 << 16 else { throw invalid("count is \(count); between 1 and 65536 adapters are combined") }
        guard let adapters else { throw invalid("adapters is NULL but count is \(count)") }
        guard let weights else { throw invalid("weights is NULL but count is \(count)") }
        let names = try (0..<count).map { try string(adapters[$0], "adapters[\($0)]") }
        let values = Array(UnsafeBufferPointer(start: weights, count: count))
        let optionsJSON = try options.map { try string($0, "options_json") }
        let json = try s.combineAdapters(name: newName, adapters: names, weights: values, optionsJSON: optionsJSON)
        if let report { report.pointee = try mallocString(json) }
    }
}

/// The C entry point `graft_model_save_merged`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_save_merged")
public func graft_model_save_merged(_ model: OpaquePointer?, _ adapter: UnsafePointer<CChar>?,
                                    _ directory: UnsafePointer<CChar>?) -> graft_status {
    guarded {
        let s = try session(model)
        try s.mergeAndUnloadSave(adapter: try string(adapter, "adapter"), directory: try string(directory, "directory"))
    }
}

/// The C entry point `graft_adapter_compress`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_compress")
public func graft_adapter_compress(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ method: UnsafePointer<CChar>?,
                                   _ directory: UnsafePointer<CChar>?, _ options: UnsafePointer<CChar>?,
                                   _ report: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> graft_status {
    guarded {
        let s = try session(model)
        let kind = try AdapterCompressionMethod(name: try string(method, "method"))
        let json = try s.compressAdapter(name: try string(name, "name"), method: kind, directory: try string(directory, "directory"),
                                         optionsJSON: try options.map { try string($0, "options_json") })
        if let report { report.pointee = try mallocString(json) }
    }
}
