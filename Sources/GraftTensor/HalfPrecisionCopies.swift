import CGraftKernels

/// IEEE float16 copies of small matrices that a fast-mode generation streams once per token (a LoRA adapter's A
/// and B), made on first use inside ``withHalfPrecisionCopies(_:_:)`` and dropped when it returns.
///
/// A copy is only as current as the tensor was when it was made: the scope must not outlive any change to the
/// tensors it copies. Generation holds one for a single `generate` call, during which no weight changes; a server
/// that keeps one across decoding steps drops it whenever a request may change an adapter.
public final class HalfPrecisionCopies {
    /// Which copy: the tensor, as laid out or transposed.
    private struct Key: Hashable {
        let tensor: ObjectIdentifier
        let transposed: Bool
    }
    /// A float16 copy and the tensor it was made from, kept alive so its identifier is not reused.
    private struct Copy {
        let source: Tensor
        let half: UnsafeMutablePointer<UInt16>
    }
    private var copies: [Key: Copy] = [:]

    /// The scope open on the current thread, if any.
    public static var current: HalfPrecisionCopies? {
        cgraft_half_copies_scope().map { Unmanaged<HalfPrecisionCopies>.fromOpaque($0).takeUnretainedValue() }
    }

    /// An empty scope; open it on a thread with ``withHalfPrecisionCopies(_:_:)``.
    public init() {}

    deinit {
        for copy in copies.values { copy.half.deallocate() }
    }

    /// Bytes the copies hold.
    public var bytes: Int { copies.values.reduce(0) { $0 + 2 * $1.source.count } }

    /// `tensor`'s values rounded to float16 (made now if this scope has no copy of it yet). The pointer stays valid
    /// until the scope ends.
    public func half(of tensor: Tensor) -> UnsafePointer<UInt16> {
        copy(of: tensor, transposed: false) { cgraft_f32_to_half(tensor.pointer, $0, Int64(tensor.count)) }
    }

    /// The transpose of `tensor`, a row-major `[rows, count / rows]` matrix, rounded to float16 (`[count / rows,
    /// rows]`; made now if this scope has none yet). Nil unless `rows` divides the tensor's count.
    public func halfTransposed(of tensor: Tensor, rows: Int) -> UnsafePointer<UInt16>? {
        guard rows > 0, tensor.count % rows == 0 else { return nil }
        return copy(of: tensor, transposed: true) {
            cgraft_f32_to_half_transposed(tensor.pointer, Int64(rows), Int64(tensor.count / rows), $0)
        }
    }

    /// The kept copy, or a new buffer of `tensor.count` halves filled by `fill` and kept.
    private func copy(of tensor: Tensor, transposed: Bool,
                      fill: (UnsafeMutablePointer<UInt16>) -> Void) -> UnsafePointer<UInt16> {
        let key = Key(tensor: ObjectIdentifier(tensor), transposed: transposed)
        if let copy = copies[key] { return UnsafePointer(copy.half) }
        let half = UnsafeMutablePointer<UInt16>.allocate(capacity: max(tensor.count, 1))
        fill(half)
        copies[key] = Copy(source: tensor, half: half)
        return UnsafePointer(half)
    }
}

/// Runs `body` with `scope` open on this thread (nil: none), restoring the previous scope after.
public func withHalfPrecisionCopies<R>(_ scope: HalfPrecisionCopies?, _ body: () throws -> R) rethrows -> R {
    let previous = cgraft_half_copies_scope()
    cgraft_set_half_copies_scope(scope.map { Unmanaged.passUnretained($0).toOpaque() })
    defer { cgraft_set_half_copies_scope(previous) }
    return try withExtendedLifetime(scope) { try body() }
}

/// Runs `body` with a fresh ``HalfPrecisionCopies`` scope open on this thread when `enabled` (fast-mode
/// generation), and frees its copies after. A scope already open stays in effect for a nested call.
public func withHalfPrecisionCopies<R>(_ enabled: Bool, _ body: () throws -> R) rethrows -> R {
    guard enabled, HalfPrecisionCopies.current == nil else { return try body() }
    return try withHalfPrecisionCopies(HalfPrecisionCopies(), body)
}
