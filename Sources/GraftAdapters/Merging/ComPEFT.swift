import Foundation
import GraftIO
import GraftTensor

/// ComPEFT (Yadav et al., 2023): an adapter's update compressed by sparsification and ternary quantization, with
/// no retraining. Per tensor `τ` of the adapter (its PEFT parameters, which are its update to the frozen base):
/// keep the `k = ⌊density·n⌋` entries of largest magnitude (ties keep the earliest), and replace each kept value
/// by `α·σ(τ)·sign(τᵢ)`, with `σ(τ)` the standard deviation of the whole original tensor; the rest become 0.
///
/// Stored as a mask bit per entry, a sign bit per kept entry and one float32 scale `α·σ` per tensor
/// (``write(directory:)``: PEFT's `adapter_config.json` beside `adapter_compeft.safetensors`), so a tensor of
/// `n` float32 values (32n bits) takes `n + k` bits plus 32: about 29x smaller at density 0.1.
public struct ComPEFTAdapter: Sendable {
    /// The packed file's name in a ComPEFT directory.
    public static let fileName = "adapter_compeft.safetensors"
    /// The packed file's `format` metadata.
    public static let format = "graft-compeft-1"

    /// One compressed tensor.
    public struct Entry: Sendable, PackedAdapterEntry {
        /// Its PEFT key (`base_model.model.<path>.<parameter>`).
        public let key: String
        /// Its shape.
        public let shape: [Int]
        /// Bit `i` set where entry `i` is kept (``PackedBits``).
        public let mask: [UInt8]
        /// One bit per kept entry, in index order: set for a positive value.
        public let signs: [UInt8]
        /// `α·σ(τ)`: the magnitude of every kept value.
        public let scale: Float
        /// The number of kept entries.
        public let kept: Int

        /// The entry count.
        public var count: Int { shape.reduce(1, *) }

        /// The decompressed tensor's values written to `out` (`count` floats).
        public func decode(into out: UnsafeMutablePointer<Float>) {
            mask.withUnsafeBufferPointer { m in
                signs.withUnsafeBufferPointer { s in
                    var j = 0
                    for i in 0..<count {
                        if PackedBits.bit(m, i) {
                            out[i] = PackedBits.bit(s, j) ? scale : -scale
                            j += 1
                        } else {
                            out[i] = 0
                        }
                    }
                }
            }
        }
    }

    /// The adapter's config (PEFT's), unchanged by compression.
    public let config: AdapterConfig
    /// The compressed tensors in the adapter's state-dict order.
    public let entries: [Entry]

    /// Compresses `adapter` keeping a fraction `density` in (0, 1] of each tensor's entries, at scale `α·σ`.
    public init(compressing adapter: NamedAdapter, density: Double, alpha: Double = 1) throws {
        guard density > 0, density <= 1 else { throw GraftError.invalid("ComPEFT: density must be in (0, 1], got \(density)") }
        guard alpha.isFinite, alpha > 0 else { throw GraftError.invalid("ComPEFT: alpha must be a positive number, got \(alpha)") }
        var entries: [Entry] = []
        for (key, t) in try CompressedAdapterFile.tensors(of: adapter, method: "ComPEFT") {
            let n = t.count
            var mean = 0.0, square = 0.0
            for i in 0..<n { mean += Double(t.pointer[i]) }
            mean /= Double(max(n, 1))
            for i in 0..<n { square += (Double(t.pointer[i]) - mean) * (Double(t.pointer[i]) - mean) }
            let sigma = (square / Double(max(n, 1))).squareRoot()
            let kept = withNoGrad { t.copy() }
            TaskVectorMerge.keepLargest(kept.pointer, count: n, k: Int(density * Double(n)))
            let mask = PackedBits.pack(count: n) { kept.pointer[$0] != 0 }
            var signBits: [Bool] = []
            for i in 0..<n where kept.pointer[i] != 0 { signBits.append(kept.pointer[i] > 0) }
            entries.append(Entry(key: key, shape: t.shape, mask: mask, signs: PackedBits.pack(count: signBits.count) { signBits[$0] },
                                 scale: Float(alpha * sigma), kept: signBits.count))
        }
        self.config = adapter.config
        self.entries = entries
    }

    private init(config: AdapterConfig, entries: [Entry]) {
        self.config = config
        self.entries = entries
    }

    /// Kept entries over all entries.
    public var keptFraction: Double {
        Double(entries.reduce(0) { $0 + $1.kept }) / Double(max(1, entries.reduce(0) { $0 + $1.count }))
    }

    /// The tensors' size as float32 (4 bytes an entry), what PEFT's safetensors file spends on them.
    public var float32Bytes: Int { entries.reduce(0) { $0 + 4 * $1.count } }

    /// The packed payload: mask and sign bytes plus a float32 scale per tensor (the file adds its JSON header).
    public var packedBytes: Int { entries.reduce(0) { $0 + $1.mask.count + $1.signs.count + 4 } }

    /// Writes the compressed adapter to `directory` (crash-safely); returns the packed file's size in bytes.
    @discardableResult
    public func write(directory: String) throws -> Int {
        try CompressedAdapterFile.write(directory: directory, fileName: Self.fileName, format: Self.format, config: config,
                                        tensors: entries.map { e -> CompressedAdapterFile.Stored in
            (e.key, e.shape, [(".mask", e.mask, nil), (".signs", e.signs, nil), (".scale", nil, Tensor(shape: [1], values: [e.scale]))])
        })
    }

    /// Reads a directory ``write(directory:)`` made, checking every part's size against the tensor shapes.
    public init(directory: String) throws {
        let (config, file) = try CompressedAdapterFile.open(directory: directory, fileName: Self.fileName, format: Self.format)
        var entries: [Entry] = []
        for (key, shape) in try CompressedAdapterFile.shapes(file) {
            let n = shape.reduce(1, *)
            let mask = try CompressedAdapterFile.bytes(file, key + ".mask", expected: PackedBits.byteCount(n))
            let kept = mask.withUnsafeBufferPointer { m in (0..<n).reduce(0) { $0 + (PackedBits.bit(m, $1) ? 1 : 0) } }
            let signs = try CompressedAdapterFile.bytes(file, key + ".signs", expected: PackedBits.byteCount(kept))
            let scaleTensor = try CompressedAdapterFile.floats(file, key + ".scale", expected: 1)
            let scale = withExtendedLifetime(scaleTensor) { scaleTensor.pointer[0] }
            entries.append(Entry(key: key, shape: shape, mask: mask, signs: signs, scale: scale, kept: kept))
        }
        self.init(config: config, entries: entries)
    }
}

extension AdaptedModel {
    /// Adds adapter `name` holding `compressed`'s decompressed values (the ternary tensors) and makes it active.
    @discardableResult
    public func addAdapter(_ name: String, decompressing compressed: ComPEFTAdapter) throws -> NamedAdapter {
        try CompressedAdapterFile.add(into: self, name: name, config: compressed.config, entries: compressed.entries)
    }
}
