import Foundation
import GraftAdapters
import GraftIO

/// How an adapter is stored compressed (`graft compress --method`, `graft_adapter_compress`'s `method`).
public enum AdapterCompressionMethod: String, Sendable, CaseIterable {
    /// ComPEFT: top-`density` entries per tensor as `α·σ·sign`, a mask bit per entry (``ComPEFTAdapter``).
    case compeft
    /// 1-bit adapters: a sign bit per value and an error-minimizing scale per row group (``OneBitAdapter``).
    case onebit

    /// Parses a method name; the error lists the accepted ones.
    public init(name: String) throws {
        guard let m = AdapterCompressionMethod(rawValue: name.lowercased()) else {
            throw GraftError.invalid("compression method '\(name)' is not one of: \(Self.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        self = m
    }
}

extension GraftSession {
    /// The option keys `compressAdapter`'s JSON object may carry: `density` (ComPEFT, default 0.1) and `alpha`
    /// (ComPEFT's scale, default 1); 1-bit storage takes none.
    public static let compressionOptionKeys = ["density", "alpha"]

    /// Writes adapter `name` compressed with `method` to `directory` (PEFT's `adapter_config.json` beside the packed
    /// `adapter_compeft.safetensors` or `adapter_1bit.safetensors`, crash-safely). `optionsJSON`: nil or an object
    /// with ``compressionOptionKeys``. Returns the report as JSON: `method`, `file_bytes` (the packed file's size
    /// on disk), `float32_bytes` (the tensors as float32), `packed_bytes` (bits and scales), `kept_fraction`
    /// (ComPEFT's kept share of entries, else null). ``loadAdapter(directory:name:)`` reads the directory back into
    /// a working adapter. The C ABI's `graft_adapter_compress`, the CLI, Python, Lua and graftd call this.
    public func compressAdapter(name: String, method: AdapterCompressionMethod, directory: String, optionsJSON: String?) throws -> String {
        let source = "compress options"
        var density = 0.1, alpha = 1.0
        if let text = optionsJSON, !text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            let object = try parseJSONObject(text, source: source)
            for key in object.keys.sorted() where !Self.compressionOptionKeys.contains(key) {
                throw GraftError.invalid("\(source): unknown key '\(key)' (known: \(Self.compressionOptionKeys.joined(separator: ", ")))")
            }
            for (key, value) in object where !(value is NSNull) {
                guard !JSONScalar.isBool(value), let d = JSONScalar.number(value) else {
                    throw GraftError.invalid("\(source): '\(key)' must be a number, got \(JSONScalar.describe(value))")
                }
                if key == "density" { density = d } else { alpha = d }
            }
            if method == .onebit, let key = object.keys.sorted().first(where: { !(object[$0] is NSNull) }) {
                throw GraftError.invalid("\(source): '\(key)' applies to compeft only; onebit takes no options")
            }
        }
        let adapter = try adapted.adapter(name)
        let report: [String: Any]
        switch method {
        case .compeft:
            let c = try ComPEFTAdapter(compressing: adapter, density: density, alpha: alpha)
            let bytes = try c.write(directory: directory)
            report = ["method": method.rawValue, "file_bytes": bytes, "float32_bytes": c.float32Bytes,
                      "packed_bytes": c.packedBytes, "kept_fraction": c.keptFraction]
        case .onebit:
            let q = try OneBitAdapter(quantizing: adapter)
            let bytes = try q.write(directory: directory)
            report = ["method": method.rawValue, "file_bytes": bytes, "float32_bytes": q.float32Bytes,
                      "packed_bytes": q.packedBytes, "kept_fraction": NSNull()]
        }
        return try Self.jsonString(report)
    }

    /// The compressed adapter in `directory`, if it holds one: added as `name` from its packed file (nil when the
    /// directory is a plain PEFT adapter).
    func loadCompressedAdapter(directory: String, name: String) throws -> NamedAdapter? {
        let fm = FileManager.default
        if fm.fileExists(atPath: directory + "/" + ComPEFTAdapter.fileName) {
            return try adapted.addAdapter(name, decompressing: try ComPEFTAdapter(directory: directory))
        }
        if fm.fileExists(atPath: directory + "/" + OneBitAdapter.fileName) {
            return try adapted.addAdapter(name, dequantizing: try OneBitAdapter(directory: directory))
        }
        return nil
    }
}
