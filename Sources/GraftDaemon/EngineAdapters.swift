import Foundation
import Graft

/// The adapters of a loaded model: add, load, save, list, delete and choose the active one (engine worker thread).
extension Engine {
    /// Attaches a new adapter from its PEFT-shaped JSON config.
    func addAdapter(_ r: Graft_V1_AddAdapter, _ context: RequestContext) throws {
        try session(r.modelID).addAdapter(name: try nonEmpty(r.name, "add_adapter.name"), configJSON: r.configJson, seed: r.seed)
        ok(context)
    }

    /// Loads a PEFT adapter directory (on the daemon's machine; relative paths against graftd's working
    /// directory) as `name` (default "default").
    func loadAdapter(_ r: Graft_V1_LoadAdapter, _ context: RequestContext) throws {
        let name = r.name.isEmpty ? "default" : r.name
        let s = try session(r.modelID)
        let path = try clientPath(r.path, "load_adapter.path")
        try path.mustExist("adapter directory")
        try path.use { _ = try s.loadAdapter(directory: $0, name: name) }
        ok(context)
    }

    /// Writes an adapter in PEFT's format to a directory on the daemon's machine (relative paths against
    /// graftd's working directory).
    func saveAdapter(_ r: Graft_V1_SaveAdapter, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        let name = try nonEmpty(r.name, "save_adapter.name")
        _ = try s.adapted.adapter(name)  // a missing adapter is not the path's fault
        try clientPath(r.path, "save_adapter.path").use { try s.saveAdapter(name, directory: $0) }
        ok(context)
    }

    /// Answers with the model's adapters as JSON.
    func listAdapters(_ r: Graft_V1_ListAdapters, _ context: RequestContext) throws {
        let json = try session(r.modelID).adapterListJSON()
        reply(context) { $0.adapters = .with { $0.adaptersJson = json } }
    }

    /// Removes an adapter.
    func deleteAdapter(_ r: Graft_V1_DeleteAdapter, _ context: RequestContext) throws {
        try session(r.modelID).deleteAdapter(name: try nonEmpty(r.name, "delete_adapter.name"))
        ok(context)
    }

    /// Makes an adapter active, or disables adapters when the name is empty.
    func setActiveAdapter(_ r: Graft_V1_SetActiveAdapter, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        if r.name.isEmpty {
            s.adapted.setAdaptersDisabled(true)
        } else {
            try s.adapted.setActiveAdapter(r.name)
            s.adapted.setAdaptersDisabled(false)
        }
        ok(context)
    }
}
