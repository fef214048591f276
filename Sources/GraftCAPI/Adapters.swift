// The C ABI: adapters (add, load, save, list, activate, enable, delete, merge, unmerge).
import CGraftABI
import Graft

/// The C entry point `graft_adapter_add`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_add")
public func graft_adapter_add(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ config: UnsafePointer<CChar>?) -> graft_status {
    guarded {
        let s = try session(model)
        try s.addAdapter(name: try string(name, "name"), configJSON: try string(config, "config_json"))
    }
}

/// The C entry point `graft_adapter_load`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_load")
public func graft_adapter_load(_ model: OpaquePointer?, _ directory: UnsafePointer<CChar>?, _ name: UnsafePointer<CChar>?) -> graft_status {
    guarded {
        let s = try session(model)
        let dir = try string(directory, "directory")
        let adapterName = name == nil ? "default" : try string(name, "name")
        try s.loadAdapter(directory: dir, name: adapterName)
    }
}

/// The C entry point `graft_adapter_save`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_save")
public func graft_adapter_save(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ directory: UnsafePointer<CChar>?) -> graft_status {
    guarded {
        let s = try session(model)
        try s.saveAdapter(try string(name, "name"), directory: try string(directory, "directory"))
    }
}

/// The C entry point `graft_adapter_list`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_list")
public func graft_adapter_list(_ model: OpaquePointer?, _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> graft_status {
    guarded {
        let s = try session(model)
        guard let json else { throw invalid("json is NULL") }
        json.pointee = try mallocString(try s.adapterListJSON())
    }
}

/// The C entry point `graft_adapter_set_active`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_set_active")
public func graft_adapter_set_active(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> graft_status {
    guarded { try session(model).adapted.setActiveAdapter(try string(name, "name")) }
}

/// The C entry point `graft_adapter_set_enabled`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_set_enabled")
public func graft_adapter_set_enabled(_ model: OpaquePointer?, _ enabled: Int32) -> graft_status {
    guarded { try session(model).adapted.setAdaptersDisabled(enabled == 0) }
}

/// The C entry point `graft_adapter_delete`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_delete")
public func graft_adapter_delete(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> graft_status {
    guarded { try session(model).deleteAdapter(name: try string(name, "name")) }
}

/// The C entry point `graft_adapter_merge`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_merge")
public func graft_adapter_merge(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> graft_status {
    guarded { try session(model).adapted.merge(try string(name, "name")) }
}

/// The C entry point `graft_adapter_unmerge`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_adapter_unmerge")
public func graft_adapter_unmerge(_ model: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> graft_status {
    guarded { try session(model).adapted.unmerge(try string(name, "name")) }
}
