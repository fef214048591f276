/// The tensor element formats of ggml/GGUF, with their on-disk numbering.
///
/// Block formats pack `blockSize` elements into `typeSize` bytes. Every type's size is known so a file's
/// layout can be validated, but only some can be converted to Float32 (see ``canDequantize``).
public enum GGMLType: UInt32, Sendable, CaseIterable {
    /// IEEE binary32.
    case f32 = 0
    /// IEEE binary16.
    case f16 = 1
    /// 32 values: f16 scale `d`, 16 bytes of 4-bit quants; value `(q - 8) * d`.
    case q4_0 = 2
    /// 32 values: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit quants; value `q * d + m`.
    case q4_1 = 3
    /// 32 values: f16 `d`, 32 high bits, 16 bytes of low nibbles; value `(q - 16) * d`.
    case q5_0 = 6
    /// 32 values: f16 `d`, f16 `m`, 32 high bits, 16 bytes of low nibbles; value `q * d + m`.
    case q5_1 = 7
    /// 32 values: f16 scale `d`, 32 signed bytes; value `q * d`.
    case q8_0 = 8
    /// 32 values: f16 `d`, f16 sum, 32 signed bytes (an intermediate format for dot products).
    case q8_1 = 9
    /// 256-value super-block, 2-bit.
    case q2_K = 10
    /// 256-value super-block, 3-bit.
    case q3_K = 11
    /// 256-value super-block of 8 sub-blocks with 6-bit scales and mins, 4-bit quants.
    case q4_K = 12
    /// 256-value super-block of 8 sub-blocks with 6-bit scales and mins, 5-bit quants.
    case q5_K = 13
    /// 256-value super-block of 16 sub-blocks with 8-bit scales, 6-bit quants.
    case q6_K = 14
    /// 256-value super-block, 8-bit (an intermediate format for dot products).
    case q8_K = 15
    /// i-quant, 2.06 bits per weight.
    case iq2_xxs = 16
    /// i-quant, 2.31 bits per weight.
    case iq2_xs = 17
    /// i-quant, 3.06 bits per weight.
    case iq3_xxs = 18
    /// i-quant, 1.56 bits per weight.
    case iq1_s = 19
    /// i-quant, 4.5 bits per weight, non-linear.
    case iq4_nl = 20
    /// i-quant, 3.44 bits per weight.
    case iq3_s = 21
    /// i-quant, 2.5 bits per weight.
    case iq2_s = 22
    /// i-quant, 4.25 bits per weight, non-linear.
    case iq4_xs = 23
    /// Signed 8-bit integer.
    case i8 = 24
    /// Signed 16-bit integer.
    case i16 = 25
    /// Signed 32-bit integer.
    case i32 = 26
    /// Signed 64-bit integer.
    case i64 = 27
    /// IEEE binary64.
    case f64 = 28
    /// i-quant, 1.75 bits per weight.
    case iq1_m = 29
    /// bfloat16.
    case bf16 = 30
    /// Ternary, 1.69 bits per weight.
    case tq1_0 = 34
    /// Ternary, 2.06 bits per weight.
    case tq2_0 = 35
    /// Microscaling FP4.
    case mxfp4 = 39

    /// Elements per block (1 for plain scalar types).
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64: return 1
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q8_1, .iq4_nl, .mxfp4: return 32
        default: return 256
        }
    }

    /// Bytes per block.
    public var typeSize: Int {
        switch self {
        case .f32, .i32: return 4
        case .f16, .bf16, .i16: return 2
        case .f64, .i64: return 8
        case .i8: return 1
        case .q4_0: return 18
        case .q4_1: return 20
        case .q5_0: return 22
        case .q5_1: return 24
        case .q8_0: return 34
        case .q8_1: return 36
        case .q2_K: return 84
        case .q3_K: return 110
        case .q4_K: return 144
        case .q5_K: return 176
        case .q6_K: return 210
        case .q8_K: return 292
        case .iq2_xxs: return 66
        case .iq2_xs: return 74
        case .iq3_xxs: return 98
        case .iq1_s: return 50
        case .iq4_nl: return 18
        case .iq3_s: return 110
        case .iq2_s: return 82
        case .iq4_xs: return 136
        case .iq1_m: return 56
        case .tq1_0: return 54
        case .tq2_0: return 66
        case .mxfp4: return 17
        }
    }

    /// The name ggml prints (`Q4_1`, `F16`, `Q6_K`, ...).
    public var name: String { String(describing: self).uppercased() }

    /// Whether ``dequantize(_:into:count:)`` supports this type.
    public var canDequantize: Bool {
        switch self {
        case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64,
             .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q4_K, .q5_K, .q6_K:
            return true
        default:
            return false
        }
    }
}
