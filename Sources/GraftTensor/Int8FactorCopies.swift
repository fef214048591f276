import CGraftKernels
import Synchronization

/// The last ``Int8FactorCopies/generation`` handed out.
private let lastFactorCopiesGeneration = Atomic<UInt64>(0)

/// The scope of a generation's decoding steps: symmetric int8 copies of small matrices that fast mode streams once
/// per token (a LoRA adapter's A and B), made on first use inside ``withInt8FactorCopies(_:_:)`` and dropped when
/// it returns, and the ``generation`` that adapters tag what they work out once per scope with (in either mode).
///
/// A copy is only as current as the tensor was when it was made: the scope must not outlive any change to the
/// adapters it serves (their tensors or their configuration). Generation holds one for a single `generate` call,
/// during which nothing changes; a server that keeps one across decoding steps drops it whenever a request may
/// change an adapter.
public final class Int8FactorCopies {
    /// An int8 matrix and one scale per row: row `r`'s values times `scales[r]` approximate the source's.
    public struct Copy: @unchecked Sendable {
        /// Row-major int8 values.
        public let values: UnsafePointer<Int8>
        /// One scale per row (NaN for a row whose source held a non-finite value).
        public let scales: UnsafePointer<Float>
    }
    /// Which copy: the tensor's rows, or its columns (blocked).
    private struct Key: Hashable {
        let tensor: ObjectIdentifier
        let transposed: Bool
    }
    /// A copy's buffers and the tensor it was made from, kept alive so its identifier is not reused.
    private struct Kept {
        let source: Tensor
        let values: UnsafeMutablePointer<Int8>
        let valueCount: Int
        let scales: UnsafeMutablePointer<Float>
        let scaleCount: Int
    }
    private var copies: [Key: Kept] = [:]

    /// A number no other scope of this process has had: a cache of copies tagged with it is current exactly while
    /// this scope is open.
    public let generation = lastFactorCopiesGeneration.add(1, ordering: .relaxed).newValue

    /// The scope open on the current thread, if any.
    public static var current: Int8FactorCopies? {
        cgraft_factor_copies_scope().map { Unmanaged<Int8FactorCopies>.fromOpaque($0).takeUnretainedValue() }
    }

    /// An empty scope; open it on a thread with ``withInt8FactorCopies(_:_:)``.
    public init() {}

    deinit {
        for kept in copies.values {
            kept.values.deallocate()
            kept.scales.deallocate()
        }
    }

    /// Bytes the copies hold (values and scales).
    public var bytes: Int { copies.values.reduce(0) { $0 + $1.valueCount + 4 * $1.scaleCount } }

    /// `tensor` as a row-major `[rows, count / rows]` matrix rounded to int8 row by row (made now if this scope has
    /// no copy of it yet). Nil unless `rows` divides the tensor's count. The pointers stay valid until the scope ends.
    public func rows(of tensor: Tensor, rows: Int) -> Copy? {
        guard rows > 0, tensor.count % rows == 0 else { return nil }
        return copy(of: tensor, transposed: false, valueCount: tensor.count, scaleCount: rows) {
            cgraft_int8_rows(tensor.pointer, Int64(rows), Int64(tensor.count / rows), $0, $1)
        }
    }

    /// The columns of `tensor`, a row-major `[rows, count / rows]` matrix, rounded to int8 with a scale per column,
    /// in blocks of ``CGRAFT_LORA_UP_BLOCK`` rows (`cgraft_int8_columns_blocked`, what `cgraft_lora_up_int8`
    /// reads), made now if this scope has none yet. Nil unless `rows` divides the tensor's count.
    public func blockedColumns(of tensor: Tensor, rows: Int) -> Copy? {
        guard rows > 0, tensor.count % rows == 0 else { return nil }
        let cols = tensor.count / rows
        let count = Int(cgraft_int8_blocked_count(Int64(rows), Int64(cols)))
        return copy(of: tensor, transposed: true, valueCount: count, scaleCount: cols) {
            cgraft_int8_columns_blocked(tensor.pointer, Int64(rows), Int64(cols), $0, $1)
        }
    }

    /// The kept copy, or new buffers (`valueCount` values, `scaleCount` scales) filled by `fill` and kept.
    private func copy(of tensor: Tensor, transposed: Bool, valueCount: Int, scaleCount: Int,
                      fill: (UnsafeMutablePointer<Int8>, UnsafeMutablePointer<Float>) -> Void) -> Copy {
        let key = Key(tensor: ObjectIdentifier(tensor), transposed: transposed)
        if let kept = copies[key] { return Copy(values: kept.values, scales: kept.scales) }
        let values = UnsafeMutablePointer<Int8>.allocate(capacity: max(valueCount, 1))
        let scales = UnsafeMutablePointer<Float>.allocate(capacity: max(scaleCount, 1))
        fill(values, scales)
        copies[key] = Kept(source: tensor, values: values, valueCount: valueCount, scales: scales,
                           scaleCount: scaleCount)
        return Copy(values: values, scales: scales)
    }
}

/// Runs `body` with `scope` open on this thread (nil: none), restoring the previous scope after.
public func withInt8FactorCopies<R>(_ scope: Int8FactorCopies?, _ body: () throws -> R) rethrows -> R {
    let previous = cgraft_factor_copies_scope()
    cgraft_set_factor_copies_scope(scope.map { Unmanaged.passUnretained($0).toOpaque() })
    defer { cgraft_set_factor_copies_scope(previous) }
    return try withExtendedLifetime(scope) { try body() }
}

/// Runs `body` with a fresh ``Int8FactorCopies`` scope open on this thread when `enabled` (a generation), and
/// frees its copies after. A scope already open stays in effect for a nested call.
public func withInt8FactorCopies<R>(_ enabled: Bool, _ body: () throws -> R) rethrows -> R {
    guard enabled, Int8FactorCopies.current == nil else { return try body() }
    return try withInt8FactorCopies(Int8FactorCopies(), body)
}
