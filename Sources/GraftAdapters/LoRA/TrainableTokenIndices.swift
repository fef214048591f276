import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// LoRA's `trainable_token_indices` (PEFT): besides its low-rank layers, the adapter trains replacement rows for
/// the listed token ids of an embedding table, as a ``TrainableTokensLayer`` saved under PEFT's key
/// `base_model.model.<embedding path>.token_adapter.trainable_tokens_delta`. A list of ids targets the model's input
/// embedding (`word_embeddings` / `embed_tokens`); a dict maps embedding module names to their ids. Merging writes
/// the rows into the table, as PEFT's merge does.
extension AdaptedModel {
    /// The trainable-token rows `config` asks for, each with the path of its embedding (none when the key is absent).
    func trainableTokenIndexAdapters(config: AdapterConfig, state: AdapterState) throws -> [(path: String, adapter: TrainableTokensLayer)] {
        guard let value = config.value("trainable_token_indices"), !(value is NSNull) else { return [] }
        let embeddings = root.namedModules().filter { $0.module is Embedding }
        var requests: [(module: String?, ids: Any)] = []
        switch value {
        case let list as [Any]: requests = [(nil, list)]
        case let map as [String: Any]: requests = map.keys.sorted().map { ($0, map[$0] ?? NSNull()) }
        default:
            throw GraftError.invalid("\(config.source): 'trainable_token_indices' must be a list of token ids or an object {embedding name: [ids]}, got \(JSONScalar.describe(value))")
        }
        var result: [(path: String, adapter: TrainableTokensLayer)] = []
        for (module, rawIds) in requests {
            let label = module.map { "trainable_token_indices[\"\($0)\"]" } ?? "trainable_token_indices"
            guard let list = rawIds as? [Any], !list.isEmpty else {
                throw GraftError.invalid("\(config.source): '\(label)' must be a non-empty list of token ids")
            }
            let ids = try list.enumerated().map { i, v -> Int32 in
                guard let n = JSONScalar.number(v), n == n.rounded(), abs(n) < 1e9 else {
                    throw GraftError.invalid("\(config.source): '\(label)'[\(i)] = \(JSONScalar.describe(v)) is not a token id")
                }
                return Int32(n)
            }
            let hits = embeddings.filter { entry in
                if let module { return entry.name == module || entry.name.hasSuffix("." + module) }
                return entry.name.hasSuffix("word_embeddings") || entry.name.hasSuffix("embed_tokens")
            }
            guard let (path, found) = hits.first, let table = found as? Embedding else {
                throw GraftError.invalid("\(config.source): '\(label)' names no embedding of this model; embeddings: \(embeddings.map(\.name).joined(separator: ", "))")
            }
            do {
                result.append((path, try TrainableTokensLayer(table: table, tokenIndices: ids, state: state,
                                                              keyPrefix: "base_model.model.\(path).token_adapter.")))
            } catch let e as GraftError {
                throw GraftError(e.code, "\(config.source): \(label): \(e.message)")
            }
        }
        return result
    }
}
