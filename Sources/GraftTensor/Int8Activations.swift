import CGraftKernels
import Glibc

private let int8ModeKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key, nil)
    return key
}()

/// Whether products with frozen block-format weights run in the fast mode on this thread: activation rows are
/// quantized to int8 per block of 32 and multiplied with integer dot products (AVX-512 VNNI, AVX2 or a portable
/// loop), as llama.cpp does. Off by default; the exact mode multiplies float32 activations.
public enum Int8ActivationMode {
    /// True inside ``withInt8Activations(_:)`` on the current thread.
    public static var isEnabled: Bool { pthread_getspecific(int8ModeKey) != nil }

    static func set(enabled: Bool) {
        pthread_setspecific(int8ModeKey, enabled ? UnsafeRawPointer(bitPattern: 1) : nil)
    }
}

/// Runs `body` with the fast mode on this thread when `enabled` (see ``Int8ActivationMode``); decoding steps
/// (up to 8 input rows) through Q4_1 / Q8_0 weights then use int8 activations. Restores the previous mode after.
public func withInt8Activations<R>(_ enabled: Bool = true, _ body: () throws -> R) rethrows -> R {
    let previous = Int8ActivationMode.isEnabled
    Int8ActivationMode.set(enabled: enabled)
    defer { Int8ActivationMode.set(enabled: previous) }
    return try body()
}

/// Rows of activations quantized per block of 32 to int8 with one float scale per block (and the block's sum of
/// dequantized values, for formats with an offset), ready for ``FrozenMatrix/accumulateInt8Product(_:outputRows:into:ldy:)``.
public final class Int8Rows: @unchecked Sendable {
    /// Rows.
    public let rows: Int
    /// Columns (a multiple of 32).
    public let cols: Int
    /// `rows × cols` int8 values, row-major.
    public let values: UnsafeMutablePointer<Int8>
    /// One scale per block (`rows × cols / 32`): a value is `scale · q`.
    public let scales: UnsafeMutablePointer<Float>
    /// Each block's `scale · Σq` (`rows × cols / 32`), the sum of its dequantized values.
    public let sums: UnsafeMutablePointer<Float>

    /// Quantizes `rows` rows of `cols` floats at `x` (row-major). Throws unless `cols` is a multiple of 32 and
    /// `rows` ≥ 0.
    public init(_ x: UnsafePointer<Float>, rows: Int, cols: Int) throws {
        guard cols % 32 == 0, cols >= 0, rows >= 0 else {
            throw GraftError.invalid("int8 activations: [\(rows), \(cols)] is not whole rows of blocks of 32")
        }
        self.rows = rows
        self.cols = cols
        values = .allocate(capacity: max(1, rows * cols))
        scales = .allocate(capacity: max(1, rows * cols / 32))
        sums = .allocate(capacity: max(1, rows * cols / 32))
        cgraft_q8_quantize_rows(x, Int64(cols), Int64(rows), Int64(cols), values, scales, sums)
    }

    deinit {
        values.deallocate()
        scales.deallocate()
        sums.deallocate()
    }
}
