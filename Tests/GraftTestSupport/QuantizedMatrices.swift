import GraftIO

/// A `[rows, cols]` matrix of N(0, scale²) values (``randomValues(_:seed:scale:)``) encoded in `type`, as a GGUF
/// weight named `name` would load.
public func randomQuantizedMatrix(_ type: GGMLType, rows: Int, cols: Int, seed: UInt64, scale: Double = 0.05,
                                  name: String = "blk.0.attn_q.weight") throws -> QuantizedMatrix {
    let values = randomValues(rows * cols, seed: seed, scale: scale).map(Float.init)
    var bytes = [UInt8](repeating: 0, count: rows * cols / type.blockSize * type.typeSize)
    try values.withUnsafeBufferPointer { src in
        try bytes.withUnsafeMutableBytes { dst in
            guard let s = src.baseAddress, let d = dst.baseAddress else { return }
            try type.quantize(s, into: d, count: values.count)
        }
    }
    return try bytes.withUnsafeBytes { try QuantizedMatrix(name: name, type: type, rows: rows, cols: cols, bytes: $0) }
}
