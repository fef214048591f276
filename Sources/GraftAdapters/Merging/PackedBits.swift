import Foundation
import GraftIO
import GraftTensor

/// Bits packed eight to a byte, least significant bit first (entry `i` is bit `i % 8` of byte `i / 8`): the
/// storage of ComPEFT's masks and signs and of 1-bit adapters.
public enum PackedBits {
    /// The bytes holding `count` bits.
    public static func byteCount(_ count: Int) -> Int { (count + 7) / 8 }

    /// Packs `count` bits, bit `i` set where `bit(i)` is true.
    public static func pack(count: Int, _ bit: (Int) -> Bool) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: byteCount(count))
        out.withUnsafeMutableBufferPointer { p in
            for i in 0..<count where bit(i) { p[i >> 3] |= UInt8(1) << UInt8(i & 7) }
        }
        return out
    }

    /// Bit `i` of `bytes` (callers check `i < bytes.count * 8`).
    @inline(__always) public static func bit(_ bytes: UnsafeBufferPointer<UInt8>, _ i: Int) -> Bool {
        bytes[i >> 3] & (UInt8(1) << UInt8(i & 7)) != 0
    }
}

/// One packed tensor of a compressed adapter: its PEFT key, shape, and how to expand it to float32 values.
public protocol PackedAdapterEntry {
    /// The PEFT key (`base_model.model.<path>.<parameter>`).
    var key: String { get }
    /// The tensor's shape.
    var shape: [Int] { get }
    /// Writes the expanded values (`shape`'s element count of them) to `out`.
    func decode(into out: UnsafeMutablePointer<Float>)
}

/// A compressed adapter directory: PEFT's `adapter_config.json` beside one safetensors file of packed tensors
/// (ComPEFT's `adapter_compeft.safetensors`, 1-bit's `adapter_1bit.safetensors`), each original tensor stored under
/// its PEFT key with suffixes, its shape in the file's metadata as `<key>.shape` (a JSON array).
enum CompressedAdapterFile {
    /// One stored part of a tensor: raw bytes or float32 values under `<key><suffix>`.
    typealias Part = (suffix: String, bytes: [UInt8]?, floats: Tensor?)
    /// A tensor as stored: its key, shape and parts.
    typealias Stored = (key: String, shape: [Int], parts: [Part])

    /// Writes `config` + `tensors` crash-safely into `directory` (an ``AtomicDirectory`` of kind "adapter").
    static func write(directory: String, fileName: String, format: String, config: AdapterConfig,
                      tensors: [Stored]) throws -> Int {
        var writer = SafeTensorsWriter()
        writer.metadata = ["format": format]
        for t in tensors {
            writer.metadata["\(t.key).shape"] = "[" + t.shape.map(String.init).joined(separator: ",") + "]"
            for part in t.parts {
                if let bytes = part.bytes { try writer.add(t.key + part.suffix, uint8s: bytes) }
                if let floats = part.floats { try writer.add(t.key + part.suffix, floats) }
            }
        }
        let json = try JSONSerialization.data(withJSONObject: AdaptedModel.peftConfigJSON(config), options: [.prettyPrinted, .sortedKeys])
        let data = writer.serialized()
        try AtomicDirectory.write(directory: directory, kind: "adapter", files: [(fileName, data), ("adapter_config.json", [UInt8](json))])
        return data.count
    }

    /// Opens a compressed directory: its config and packed file (checked to be of `format`).
    static func open(directory: String, fileName: String, format: String) throws -> (AdapterConfig, SafeTensorsFile) {
        let saved = try SavedDirectory(path: directory)
        guard saved.contains("adapter_config.json"), saved.contains(fileName) else {
            throw GraftError(.notFound, "\(directory): needs adapter_config.json and \(fileName)")
        }
        let config = try AdapterConfig(jsonText: String(decoding: try saved.contents("adapter_config.json"), as: UTF8.self),
                                       source: directory + "/adapter_config.json")
        config.acknowledge("init_weights", "init_lora_weights", "init_ia3_weights")
        let file = try saved.safeTensors(fileName)
        guard file.metadata["format"] == format else {
            throw GraftError.format("\(file.path): format is '\(file.metadata["format"] ?? "(missing)")', expected '\(format)'")
        }
        return (config, file)
    }

    /// The bytes of U8 tensor `name`, `expected` of them.
    static func bytes(_ file: SafeTensorsFile, _ name: String, expected: Int) throws -> [UInt8] {
        guard let info = file.info(name), info.dtype == .u8 else {
            throw GraftError.format("\(file.path): missing U8 tensor '\(name)'")
        }
        let out = try file.withRawBytes(name) { [UInt8]($0) }
        guard out.count == expected, info.shape == [expected] else {
            throw GraftError.format("\(file.path): '\(name)' has \(out.count) bytes, \(expected) expected")
        }
        return out
    }

    /// The F32 tensor `name` with `expected` finite values.
    static func floats(_ file: SafeTensorsFile, _ name: String, expected: Int) throws -> Tensor {
        guard file.contains(name) else { throw GraftError.format("\(file.path): missing tensor '\(name)'") }
        let t = try file.tensor(name)
        guard t.count == expected else { throw GraftError.format("\(file.path): '\(name)' has \(t.count) values, \(expected) expected") }
        if let i = (0..<t.count).first(where: { !t.pointer[$0].isFinite }) {
            throw GraftError.format("\(file.path): '\(name)' value \(i) is \(t.pointer[i])")
        }
        return t
    }

    /// The tensors a compressor may replace: the adapter's PEFT parameters. Adapters whose file holds more
    /// (`modules_to_save` copies, shared banks or projections, integer buffers) are refused by name.
    static func tensors(of adapter: NamedAdapter, method: String) throws -> [(key: String, tensor: Tensor)] {
        if let (path, _, _) = adapter.savedModules.first {
            throw GraftError(.unsupported, "\(method): adapter '\(adapter.name)' trains '\(path)' in full (modules_to_save); only adapter parameters are compressed")
        }
        if let (key, _) = adapter.shared.first {
            throw GraftError(.unsupported, "\(method): adapter '\(adapter.name)' (\(adapter.config.peftType)) has the shared tensor '\(key)'; only per-layer parameters are compressed")
        }
        for (path, _, layer) in adapter.layers where !layer.integerBuffers.isEmpty || !layer.savedBuffers.isEmpty {
            throw GraftError(.unsupported, "\(method): adapter '\(adapter.name)' (\(adapter.config.peftType)) keeps frozen buffers at '\(path)'; only plain parameters are compressed")
        }
        let tensors = adapter.peftStateDict
        guard !tensors.isEmpty else { throw GraftError.invalid("\(method): adapter '\(adapter.name)' has no parameters") }
        return tensors
    }

    /// The tensors a packed file describes (`<key>.shape` metadata), by key.
    static func shapes(_ file: SafeTensorsFile) throws -> [(key: String, shape: [Int])] {
        var out: [(key: String, shape: [Int])] = []
        for (k, v) in file.metadata.sorted(by: { $0.key < $1.key }) where k.hasSuffix(".shape") {
            let parts = v.trimmingCharacters(in: CharacterSet(charactersIn: "[] ")).split(separator: ",")
            let dims = parts.compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            guard !parts.isEmpty, dims.count == parts.count, dims.allSatisfy({ $0 > 0 && $0 <= 1 << 28 }),
                  dims.reduce(1, { $0.multipliedReportingOverflow(by: $1).partialValue }) <= 1 << 31 else {
                throw GraftError.format("\(file.path): metadata '\(k)' = '\(v)' is not a shape")
            }
            out.append((String(k.dropLast(".shape".count)), dims))
        }
        guard !out.isEmpty else { throw GraftError.format("\(file.path): describes no tensors") }
        return out
    }

    /// Adds adapter `name` from `config` holding `entries` expanded (and makes it active).
    static func add<E: PackedAdapterEntry>(into model: AdaptedModel, name: String, config: AdapterConfig, entries: [E]) throws -> NamedAdapter {
        let byKey = Dictionary(entries.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a })
        return try load(into: model, name: name, config: config, shapes: byKey.mapValues(\.shape)) { key, target in
            guard let e = byKey[key] else { throw GraftError.format("compressed adapter '\(name)': no tensor '\(key)'") }
            e.decode(into: target.pointer)
        }
    }

    /// Adds adapter `name` from `config` and fills each of its PEFT tensors with `decode(key, target)`; the keys
    /// and shapes must be exactly the adapter's. The adapter is removed again when anything fails.
    static func load(into model: AdaptedModel, name: String, config: AdapterConfig, shapes: [String: [Int]],
                     decode: (String, Tensor) throws -> Void) throws -> NamedAdapter {
        let adapter = try model.addAdapter(name, config: config)
        adapter.markWeightsLoaded()
        do {
            let state = adapter.peftStateDict
            for (key, tensor) in state {
                guard let shape = shapes[key] else { throw GraftError.format("compressed adapter '\(name)': no '\(key)' (the adapter expects it)") }
                guard shape == tensor.shape else {
                    throw GraftError.format("compressed adapter '\(name)': '\(key)' has shape \(shape), the adapter expects \(tensor.shape)")
                }
                try decode(key, tensor)
            }
            if let extra = Set(shapes.keys).subtracting(state.map(\.key)).sorted().first {
                throw GraftError.format("compressed adapter '\(name)': '\(extra)' belongs to no module the config adapts")
            }
        } catch {
            try? model.deleteAdapter(name)
            throw error
        }
        return adapter
    }
}
