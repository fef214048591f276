import Foundation
import Graft

/// PEFT's add_weighted_adapter over the wire (engine worker thread).
extension Engine {
    /// Combines LoRA adapters of a loaded model into a new adapter, answering with the combination's report.
    func combineAdapters(_ r: Graft_V1_CombineAdapters, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        let json = try s.combineAdapters(name: try nonEmpty(r.name, "combine_adapters.name"), adapters: r.adapters,
                                         weights: r.weights, optionsJSON: r.optionsJson.isEmpty ? nil : r.optionsJson)
        reply(context) { $0.combined = .with { $0.reportJson = json } }
    }

    /// Writes an adapter of a loaded model compressed (ComPEFT or 1-bit), answering with the sizes.
    func compressAdapter(_ r: Graft_V1_CompressAdapter, _ context: RequestContext) throws {
        let s = try session(r.modelID)
        let method = try AdapterCompressionMethod(name: try nonEmpty(r.method, "compress_adapter.method"))
        let json = try s.compressAdapter(name: try nonEmpty(r.name, "compress_adapter.name"), method: method,
                                         directory: try nonEmpty(r.directory, "compress_adapter.directory"),
                                         optionsJSON: r.optionsJson.isEmpty ? nil : r.optionsJson)
        reply(context) { $0.compressed = .with { $0.reportJson = json } }
    }
}
