import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// LoRA's `layer_replication` (PEFT, after mergekit's pass-through merges): before the adapter attaches, the
/// model's layer stack is rebuilt from `[start, end)` ranges of its layers — `[[0, 4], [2, 6]]` over six layers
/// stacks `0 1 2 3 2 3 4 5` — the copies sharing the base weights, and each copy gets its own LoRA under the
/// renumbered names (`encoder.layer.4.…` adapts the copy of layer 2), as PEFT's `replicate_layers` does.
///
/// The rebuilt stack is the model's for as long as adapters are attached (PEFT keeps it for good); deleting the
/// last adapter restores the stack as loaded, so a server's base model does not stay deeper. A model that has
/// adapters already cannot be rebuilt (they would lose their layers), unless the ranges are the ones in force.
/// Merging is refused: the copies of a layer share one weight, so a merged ΔW would reach every copy (PEFT
/// writes it into the shared tensor all the same).
enum LayerReplicationOption {
    /// `layer_replication` of `config`: nil when absent or null, else a list of `[start, end)` pairs.
    static func parse(_ config: AdapterConfig) throws -> [[Int]]? {
        guard let value = config.value("layer_replication"), !(value is NSNull) else { return nil }
        guard let list = value as? [Any], !list.isEmpty else {
            throw GraftError.invalid("\(config.source): 'layer_replication' must be a non-empty list of [start, end) pairs, got \(JSONScalar.describe(value))")
        }
        return try list.enumerated().map { i, entry in
            guard let pair = entry as? [Any], pair.count == 2, let a = JSONScalar.integer(pair[0]), let b = JSONScalar.integer(pair[1]) else {
                throw GraftError.invalid("\(config.source): 'layer_replication'[\(i)] = \(JSONScalar.describe(entry)) is not a [start, end) pair of integers")
            }
            return [a, b]
        }
    }
}

extension AdaptedModel {
    /// Rebuilds the layer stack as `config`'s `layer_replication` asks; returns how to undo it when the adapter
    /// then fails to attach (nil when nothing changed).
    func applyLayerReplication(_ config: AdapterConfig) throws -> (() -> Void)? {
        guard config.peftType == LoRAFactory.peftType, let ranges = try LayerReplicationOption.parse(config) else { return nil }
        guard let host = root as? any LayerReplicating else {
            throw GraftError(.unsupported, "\(config.source): 'layer_replication' needs a model with a layer stack (BERT or Llama); \(root.typeName) has none")
        }
        if host.layerReplication == ranges { return nil }
        guard adapters.isEmpty else {
            throw GraftError(.unsupported, "\(config.source): 'layer_replication' \(ranges) rebuilds the model's layer stack, but adapters are attached (\(adapters.map(\.name).joined(separator: ", "))) whose layers it would drop; add it to a model without adapters")
        }
        let previous = host.layerReplication
        do {
            try host.replicateLayers(ranges)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(e.message)")
        }
        return { try? host.replicateLayers(previous) }
    }

    /// Restores the layer stack as loaded once no adapter is attached.
    func restoreLayerStackIfUnused() {
        guard adapters.isEmpty, let host = root as? any LayerReplicating, host.layerReplication != nil else { return }
        try? host.replicateLayers(nil)
    }

    /// Throws when `adapter` was built with `layer_replication` (its layer copies share their base weights).
    func refuseMergingReplicated(_ adapter: NamedAdapter) throws {
        guard adapter.config.peftType == LoRAFactory.peftType, let ranges = try LayerReplicationOption.parse(adapter.config) else { return }
        throw GraftError(.unsupported, "adapter '\(adapter.name)' uses layer_replication \(ranges): the copies of a layer share one base weight, so merging one copy's ΔW would change every copy; it runs unmerged")
    }
}
