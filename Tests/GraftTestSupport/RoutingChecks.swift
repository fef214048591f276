import Foundation
import GraftModels
import GraftTensor

/// The greedy continuation of `prompt` by `steps` uncached passes over the whole sequence (the argmax of the last
/// position each time): what cached generation must reproduce.
public func uncachedGreedy(_ model: LlamaModel, prompt: [Int32], steps: Int) throws -> [Int32] {
    var ids = prompt
    let vocab = model.config.vocabSize
    for _ in 0..<steps {
        let logits = try withNoGrad { try model.logits(TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
        let last = Array(logits.scalars.suffix(vocab))
        var best = 0
        for j in 1..<vocab where last[j] > last[best] { best = j }
        ids.append(Int32(best))
    }
    return Array(ids.dropFirst(prompt.count))
}

/// For each change `(field, value)`, rewrites the JSON config at `path` with that field changed (the rest as
/// saved), calls `load` on a `fresh()` model and returns the message of the `GraftError` it threw (nil when it
/// did not throw) with that model. The saved config is restored afterwards.
public func loadsWithChangedConfig(path: String, changes: [(field: String, value: Any)], fresh: () throws -> LlamaModel,
                                   load: (LlamaModel) throws -> Void) throws -> [(message: String?, model: LlamaModel)] {
    let url = URL(fileURLWithPath: path)
    let original = try Data(contentsOf: url)
    defer { try? original.write(to: url) }
    return try changes.map { change in
        guard var config = try JSONSerialization.jsonObject(with: original) as? [String: Any] else {
            throw GraftError.format("\(path) is not a JSON object")
        }
        config[change.field] = change.value
        try JSONSerialization.data(withJSONObject: config).write(to: url)
        let model = try fresh()
        do {
            try load(model)
            return (nil, model)
        } catch let error as GraftError {
            return (error.message, model)
        }
    }
}
