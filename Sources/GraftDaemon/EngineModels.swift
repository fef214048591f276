import Foundation
import Graft
import GraftAssets

/// The engine's model registry: loading, looking up and unloading models (engine worker thread).
extension Engine {
    /// The model loaded as `id`; throws NOT_FOUND naming the loaded ones.
    func session(_ id: String) throws -> GraftSession {
        guard let s = models[id] else {
            throw GraftError(.notFound, id.isEmpty ? "model_id is empty; load a model first (load_model)"
                : "no model '\(id)' (loaded: \(models.keys.sorted().joined(separator: ", ")))")
        }
        return s
    }

    /// `value`, or an INVALID_ARGUMENT error naming `field` when it is empty.
    func nonEmpty(_ value: String, _ field: String) throws -> String {
        guard !value.isEmpty else { throw GraftError.invalid("\(field) is empty") }
        return value
    }

    /// Loads a model (a path, relative ones against graftd's working directory, or an asset name such as
    /// "minilm") under the requested or a generated id.
    func loadModel(_ r: Graft_V1_LoadModel, _ context: RequestContext) throws {
        let name = try nonEmpty(r.path, "load_model.path")
        let asset = AssetCache.resolveModelPath(name)
        // An asset name ("minilm") is a path in the cache; anything else is the client's path.
        let path = asset != name ? ClientPath(asset, field: "load_model.path") : ClientPath(name, field: "load_model.path")
        if asset == name { try path.mustExist("model file or directory (nor is '\(name)' an asset name such as minilm or smollm2)") }
        let task = try Self.sessionTask(r.task)
        var id = r.modelID
        if id.isEmpty {
            repeat { modelCount += 1; id = "m\(modelCount)" } while models[id] != nil
        } else if models[id] != nil {
            throw GraftError(.state, "model_id '\(id)' is already loaded; unload it first or choose another")
        }
        var options = ModelOptions()
        options.task = task
        if r.numLabelsSet != nil { options.numLabels = Int(r.numLabels) }
        options.seed = r.seed
        options.computeDType = try Self.computeDType(r.computeDtype)
        if !r.moeBase.isEmpty {
            let moeBase = ClientPath(r.moeBase, field: "load_model.moe_base")
            try moeBase.mustExist("MoE base directory (graft moefy --output)")
            options.moeBase = moeBase.resolved
        }
        try options.validate()
        let s = try path.use { try AssetCache.openSession($0, options: options) }
        models[id] = s
        publishModelNames()
        let info = try s.infoJSON()
        reply(context) { $0.modelLoaded = .with { $0.modelID = id; $0.infoJson = info } }
    }

    /// Unloads a model that no running job trains; finished jobs on it lose their trainers.
    func unloadModel(_ r: Graft_V1_UnloadModel, _ context: RequestContext) throws {
        let id = r.modelID
        _ = try session(id)
        if let job = jobs.all.first(where: { $0.modelID == id && !$0.isFinished }) {
            throw GraftError(.state, "model '\(id)' is being trained by job \(job.id); cancel it first")
        }
        for job in jobs.all where job.modelID == id { job.training = nil }
        models[id] = nil
        publishModelNames()
        ok(context)
    }

    /// Answers with the model's architecture, sizes and module tree as JSON.
    func modelInfo(_ r: Graft_V1_ModelInfoRequest, _ context: RequestContext) throws {
        let info = try session(r.modelID).infoJSON()
        reply(context) { $0.modelInfo = .with { $0.infoJson = info } }
    }
}
