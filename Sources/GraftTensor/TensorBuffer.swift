import CGraftSystem
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A reference-counted, 64-byte aligned block of `Float`s: the storage behind every ``Tensor``.
///
/// Hot loops reach the memory through ``pointer`` directly; the buffer frees itself when the last
/// tensor that shares it goes away.
public final class TensorBuffer: @unchecked Sendable {
    /// Number of `Float` elements.
    public let count: Int
    /// The first element. Valid for `count` elements while the buffer lives.
    public let pointer: UnsafeMutablePointer<Float>
    /// The buffer a view borrows its memory from (kept alive by the view); nil when this buffer owns its memory.
    private let owner: TensorBuffer?

    /// Sets malloc up once for the small blocks it still serves (``BufferPool`` serves the large ones).
    static let allocatorTuned: Bool = {
        cgraft_tune_malloc()
        return true
    }()

    /// Whether the memory came from ``BufferPool`` (and goes back to it).
    private let pooled: Bool

    /// Allocates `count` elements, zero-filled unless `zeroed` is false.
    public init(count: Int, zeroed: Bool = true) {
        _ = TensorBuffer.allocatorTuned
        self.count = count
        let bytes = max(count, 1) * MemoryLayout<Float>.stride
        if bytes >= BufferPool.minimumBytes, let block = BufferPool.shared.take(bytes) {
            let p = block.pointer.bindMemory(to: Float.self, capacity: count)
            // A fresh mapping is already zero-filled.
            if zeroed && !block.fresh { p.update(repeating: 0, count: count) }
            pointer = p
            pooled = true
            owner = nil
            return
        }
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 64, (bytes + 63) & ~63) == 0, let raw else {
            // Allocation failure of a size the caller already validated is not recoverable here.
            fatalError("Graft: out of memory allocating \(bytes) bytes")
        }
        let p = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        if zeroed { p.initialize(repeating: 0, count: max(count, 1)) }
        pointer = p
        pooled = false
        owner = nil
    }

    /// A view of `count` elements of `owner` starting at `offset`: no copy; writes go to `owner`'s memory,
    /// which stays alive as long as the view does.
    public init(viewing owner: TensorBuffer, offset: Int, count: Int) {
        precondition(offset >= 0 && count >= 0 && offset + count <= owner.count,
                     "view \(offset)..<\(offset + count) of a buffer of \(owner.count)")
        self.count = count
        pointer = owner.pointer + offset
        pooled = false
        self.owner = owner
    }

    /// Allocates a buffer holding a copy of `values`.
    public convenience init(copying values: UnsafeBufferPointer<Float>) {
        self.init(count: values.count, zeroed: false)
        if let base = values.baseAddress { pointer.update(from: base, count: values.count) }
    }

    deinit {
        guard owner == nil else { return }
        if pooled {
            BufferPool.shared.give(UnsafeMutableRawPointer(pointer), bytes: count * MemoryLayout<Float>.stride)
        } else {
            free(pointer)
        }
    }

    /// The elements as a mutable buffer pointer.
    @inlinable public var buffer: UnsafeMutableBufferPointer<Float> {
        UnsafeMutableBufferPointer(start: pointer, count: count)
    }
}
