import Foundation
import GraftIO
import GraftTensor

/// 1-bit adapter storage (Jie et al., 2023, "Revisiting the parameter efficiency of adapters from the perspective
/// of precision redundancy"): each adapter weight becomes `s·sign(w)` with the scale that minimizes the
/// quantization error. For one group of values `w₁…wₙ`, `‖w − s·sign(w)‖² = ‖w‖² − 2s·Σ|wᵢ| + n·s²` is smallest at
/// `s* = Σ|wᵢ|/n`, the mean magnitude, where the error is `‖w‖² − n·s*²`. A group is one row of a tensor (its last
/// dimension) when rows hold at least ``minimumRowGroup`` values, else the whole tensor (LoRA's `lora_B` rows hold
/// only `r` values, where a float per row would cost more than the bits); `sign(0)` counts as `+`.
///
/// Stored as one bit per value and one float32 scale per row (``write(directory:)``: PEFT's `adapter_config.json`
/// beside `adapter_1bit.safetensors`), about 1/32 of float32 plus 32 bits a group; loading it back gives a working
/// adapter of the same method with the quantized weights.
public struct OneBitAdapter: Sendable {
    /// The packed file's name in a 1-bit directory.
    public static let fileName = "adapter_1bit.safetensors"
    /// The packed file's `format` metadata.
    public static let format = "graft-1bit-1"

    /// Rows shorter than this share one scale per tensor.
    public static let minimumRowGroup = 64

    /// The values sharing one scale in a tensor of `shape`: a row, or the whole tensor when rows are short.
    public static func groupLength(_ shape: [Int]) -> Int {
        let row = shape.last ?? 1, count = shape.reduce(1, *)
        return row >= minimumRowGroup ? row : max(count, 1)
    }

    /// One quantized tensor.
    public struct Entry: Sendable, PackedAdapterEntry {
        /// Its PEFT key.
        public let key: String
        /// Its shape; rows are its last dimension.
        public let shape: [Int]
        /// Bit `i` set where value `i` is ≥ 0 (``PackedBits``).
        public let bits: [UInt8]
        /// The error-minimizing scale of each group, `mean |w|` over the group.
        public let scales: Tensor

        /// The values per group (``OneBitAdapter/groupLength(_:)``).
        public var groupLength: Int { OneBitAdapter.groupLength(shape) }
        /// The value count.
        public var count: Int { shape.reduce(1, *) }

        /// The dequantized tensor's values written to `out` (`count` floats).
        public func decode(into out: UnsafeMutablePointer<Float>) {
            let row = groupLength
            bits.withUnsafeBufferPointer { b in
                for i in 0..<count {
                    let s = scales.pointer[i / row]
                    out[i] = PackedBits.bit(b, i) ? s : -s
                }
            }
        }
    }

    /// The adapter's config (PEFT's), unchanged.
    public let config: AdapterConfig
    /// The quantized tensors in the adapter's state-dict order.
    public let entries: [Entry]

    /// The error-minimizing scale of `w`'s `n` values: `Σ|wᵢ|/n` (accumulated in Double).
    public static func optimalScale(_ w: UnsafePointer<Float>, count n: Int) -> Float {
        var sum = 0.0
        for i in 0..<n { sum += Double(abs(w[i])) }
        return n > 0 ? Float(sum / Double(n)) : 0
    }

    /// Quantizes every tensor of `adapter` to one bit per value with a scale per group.
    public init(quantizing adapter: NamedAdapter) throws {
        var entries: [Entry] = []
        for (key, t) in try CompressedAdapterFile.tensors(of: adapter, method: "1-bit adapter") {
            let row = Self.groupLength(t.shape), rows = t.count / row
            for i in 0..<t.count where !t.pointer[i].isFinite {
                throw GraftError.invalid("1-bit adapter: '\(key)' value \(i) is \(t.pointer[i])")
            }
            let scales = Tensor(zeros: [rows])
            for r in 0..<rows { scales.pointer[r] = Self.optimalScale(t.pointer + r * row, count: row) }
            entries.append(Entry(key: key, shape: t.shape, bits: PackedBits.pack(count: t.count) { t.pointer[$0] >= 0 }, scales: scales))
        }
        self.config = adapter.config
        self.entries = entries
    }

    private init(config: AdapterConfig, entries: [Entry]) {
        self.config = config
        self.entries = entries
    }

    /// The tensors' size as float32 (4 bytes a value), what PEFT's safetensors file spends on them.
    public var float32Bytes: Int { entries.reduce(0) { $0 + 4 * $1.count } }

    /// The packed payload: the bit bytes plus a float32 scale per group (the file adds its JSON header).
    public var packedBytes: Int { entries.reduce(0) { $0 + $1.bits.count + 4 * $1.scales.count } }

    /// Writes the 1-bit adapter to `directory` (crash-safely); returns the packed file's size in bytes.
    @discardableResult
    public func write(directory: String) throws -> Int {
        try CompressedAdapterFile.write(directory: directory, fileName: Self.fileName, format: Self.format, config: config,
                                        tensors: entries.map { e -> CompressedAdapterFile.Stored in (e.key, e.shape, [(".bits", e.bits, nil), (".scales", nil, e.scales)]) })
    }

    /// Reads a directory ``write(directory:)`` made, checking every part's size against the tensor shapes.
    public init(directory: String) throws {
        let (config, file) = try CompressedAdapterFile.open(directory: directory, fileName: Self.fileName, format: Self.format)
        var entries: [Entry] = []
        for (key, shape) in try CompressedAdapterFile.shapes(file) {
            let n = shape.reduce(1, *), row = Self.groupLength(shape)
            let bits = try CompressedAdapterFile.bytes(file, key + ".bits", expected: PackedBits.byteCount(n))
            let scales = try CompressedAdapterFile.floats(file, key + ".scales", expected: n / row)
            entries.append(Entry(key: key, shape: shape, bits: bits, scales: scales))
        }
        self.init(config: config, entries: entries)
    }
}

extension AdaptedModel {
    /// Adds adapter `name` holding `quantized`'s dequantized values (`±s` per group) and makes it active.
    @discardableResult
    public func addAdapter(_ name: String, dequantizing quantized: OneBitAdapter) throws -> NamedAdapter {
        try CompressedAdapterFile.add(into: self, name: name, config: quantized.config, entries: quantized.entries)
    }
}
