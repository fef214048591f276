import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Reading the directories Graft saves routing in (an MoE base, Dr.LLM routers, Mixture-of-Recursions): the
/// config's header and the tensors, each error naming the file and the field or tensor at fault.
enum RoutingFiles {
    /// Checks that the config at `path` is `format` version 1, saved for a decoder with `model`'s layer count and
    /// hidden size.
    static func checkHeader(_ config: JSONConfig, path: String, format: String, model: LlamaModel) throws {
        guard try config.string("format") == format else {
            throw GraftError.format("\(path): field 'format' must be '\(format)'")
        }
        guard try config.int("version") == 1 else { throw GraftError.format("\(path): field 'version' must be 1") }
        for (key, expected) in [("layers", model.layers.count), ("hidden_size", model.config.hiddenSize)] {
            let v = try config.int(key)
            guard v == expected else { throw GraftError.format("\(path): field '\(key)' is \(v), the model has \(expected)") }
        }
    }

    /// Writes a routing directory of kind `kind`: the config `configName` (`fields` over `extra`, under the header
    /// ``checkHeader(_:path:format:model:)`` reads: `format`, `version` 1, `model`'s `layers` and `hidden_size`)
    /// and `writer`'s tensors as `tensorsName`, atomically with the manifest.
    static func write(directory: String, kind: String, format: String, model: LlamaModel, configName: String,
                      fields: [String: Any], extra: [String: Any], tensorsName: String, writer: SafeTensorsWriter) throws {
        var config = extra
        config.merge(fields) { _, new in new }
        config.merge(["format": format, "version": 1, "layers": model.layers.count,
                      "hidden_size": model.config.hiddenSize]) { _, new in new }
        let json = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        try AtomicDirectory.write(directory: directory, kind: kind, files: [(configName, [UInt8](json)), (tensorsName, writer.serialized())])
    }

    /// Tensor `name` of `file` (read from `path`): present, of `shape`, and finite.
    static func tensor(_ file: SafeTensorsFile, path: String, _ name: String, _ shape: [Int]) throws -> Tensor {
        guard file.contains(name) else { throw GraftError.format("\(path): tensor '\(name)' is missing") }
        let t = try file.tensor(name)
        guard t.shape == shape else { throw GraftError.format("\(path): tensor '\(name)' has shape \(t.shape), expected \(shape)") }
        for j in 0..<t.count where !t.pointer[j].isFinite {
            throw GraftError.format("\(path): tensor '\(name)' entry \(j) is not finite")
        }
        return t
    }

    /// Overwrites every parameter of `module` with the tensor `prefix + "." + name` of `file` (read from `path`),
    /// each checked as ``tensor(_:path:_:_:)`` checks it.
    static func fill(_ module: Module, prefix: String, from file: SafeTensorsFile, path: String) throws {
        for (name, t) in module.namedParameters() {
            let saved = try tensor(file, path: path, prefix + "." + name, t.shape)
            t.pointer.update(from: saved.pointer, count: t.count)
        }
    }

    /// Adds every parameter of `module` to `writer` as `prefix + "." + name`.
    static func add(_ module: Module, prefix: String, to writer: inout SafeTensorsWriter) throws {
        for (name, t) in module.namedParameters() { try writer.add(prefix + "." + name, t) }
    }
}
