#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The cache of large tensor blocks behind ``TensorBuffer``: blocks of 64 KiB and more are mapped from the kernel
/// and, when freed, kept by exact size for the next allocation of that size.
///
/// A training step allocates and frees the same activation sizes every time; reusing a block saves the page faults
/// and zeroing a fresh mapping costs. The cache barely raises the peak: an allocation it cannot serve first unmaps
/// cached blocks (oldest first) until memory mapped (live plus cached) fits within 1/8 above the most that was
/// ever live at once. Shapes that change from batch to batch (packed sequences) therefore cost a few remappings,
/// not a growing heap. malloc's own large-block cache does not have that property: its dynamic
/// mmap threshold moves freed blocks into per-thread heaps that fragment and grow step after step.
public final class BufferPool: @unchecked Sendable {
    /// The pool every tensor allocates from.
    public static let shared = BufferPool()

    /// Blocks smaller than this come from malloc.
    public static let minimumBytes = 64 << 10

    /// The cache may map up to 1/8 more than the most ever live at once. With none, a step whose sizes peak at
    /// different times unmaps blocks it needs again later in the same step (the MiniLM step B32×T64 remapped
    /// 315 MB per step and ran 22 % slower than with malloc); with 1/8 its steady state maps nothing new.
    static let slackDivisor = 8
    /// The margin is at least this much, for processes whose live tensors are small (inference), where a few
    /// blocks of each size cycle through.
    static let minimumSlack = 64 << 20

    private static let pageSize: Int = {
        let size = Int(sysconf(Int32(_SC_PAGESIZE)))
        return size > 0 ? size : 4096
    }()

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// A cached block and the number of the free that cached it.
    private typealias Entry = (pointer: UnsafeMutableRawPointer, serial: Int)
    /// Cached blocks by mapped size, most recently freed last.
    private var blocks: [Int: [Entry]] = [:]
    /// Frees in order, for evicting the oldest first; an entry whose block was reused since is stale (its serial
    /// no longer matches a cached block) and is skipped.
    private var freeOrder: [(size: Int, entry: Entry)] = []
    private var freeOrderStart = 0
    private var serial = 0
    private var cachedBlocks = 0
    private var cached = 0
    private var mapped = 0
    /// The most ever live (mapped and not cached) at once.
    private var peakLive = 0
    private var peakMapped = 0

    /// A separate pool (tests); tensors use ``shared``.
    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    /// The mapped size of a block holding `bytes`.
    static func mappedSize(_ bytes: Int) -> Int {
        (bytes + pageSize - 1) / pageSize * pageSize
    }

    /// A page-aligned block of at least `bytes`, and whether it is freshly mapped (so already zero-filled).
    /// Returns nil when the kernel refuses the mapping.
    func take(_ bytes: Int) -> (pointer: UnsafeMutableRawPointer, fresh: Bool)? {
        let size = Self.mappedSize(bytes)
        var evicted: [(size: Int, pointer: UnsafeMutableRawPointer)] = []
        pthread_mutex_lock(mutex)
        if var list = blocks[size], let block = list.popLast() {
            blocks[size] = list.isEmpty ? nil : list
            cached -= size
            cachedBlocks -= 1
            pthread_mutex_unlock(mutex)
            return (block.pointer, false)
        }
        // A miss: unmap the oldest cached blocks until the new block fits the budget.
        peakLive = max(peakLive, mapped - cached + size)
        let budget = peakLive + max(peakLive / Self.slackDivisor, Self.minimumSlack)
        while mapped + size > budget, cached > 0, freeOrderStart < freeOrder.count {
            let oldest = freeOrder[freeOrderStart]
            freeOrderStart += 1
            guard var list = blocks[oldest.size],
                  let index = list.firstIndex(where: { $0.serial == oldest.entry.serial }) else { continue }
            list.remove(at: index)
            blocks[oldest.size] = list.isEmpty ? nil : list
            cached -= oldest.size
            cachedBlocks -= 1
            mapped -= oldest.size
            evicted.append((oldest.size, oldest.entry.pointer))
        }
        compactFreeOrder()
        mapped += size
        peakMapped = max(peakMapped, mapped)
        pthread_mutex_unlock(mutex)
        for block in evicted { munmap(block.pointer, block.size) }
        guard let raw = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != MAP_FAILED else {
            pthread_mutex_lock(mutex)
            mapped -= size
            pthread_mutex_unlock(mutex)
            return nil
        }
        return (raw, true)
    }

    /// Returns a block from ``take(_:)`` of the same `bytes` to the cache.
    func give(_ pointer: UnsafeMutableRawPointer, bytes: Int) {
        let size = Self.mappedSize(bytes)
        pthread_mutex_lock(mutex)
        serial += 1
        let entry = (pointer: pointer, serial: serial)
        blocks[size, default: []].append(entry)
        freeOrder.append((size, entry))
        cached += size
        cachedBlocks += 1
        compactFreeOrder()
        pthread_mutex_unlock(mutex)
    }

    /// Unmaps every cached block (live blocks are untouched); for a process that is done with a model.
    public func releaseCached() {
        pthread_mutex_lock(mutex)
        let all = blocks
        blocks = [:]
        freeOrder = []
        freeOrderStart = 0
        mapped -= cached
        cached = 0
        cachedBlocks = 0
        pthread_mutex_unlock(mutex)
        for (size, list) in all { for block in list { munmap(block.pointer, size) } }
    }

    /// Bytes mapped now (live and cached), cached for reuse, and the most ever mapped at once (at most 1/8 above
    /// the most ever live).
    public var statistics: (mapped: Int, cached: Int, peakMapped: Int) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return (mapped, cached, peakMapped)
    }

    /// Drops consumed and stale entries of ``freeOrder`` once they outnumber the cached blocks, keeping the order
    /// (called with the mutex held).
    private func compactFreeOrder() {
        guard freeOrder.count - freeOrderStart > 2 * cachedBlocks + 1024 else { return }
        freeOrder = freeOrder[freeOrderStart...].filter { item in
            blocks[item.size]?.contains(where: { $0.serial == item.entry.serial }) ?? false
        }
        freeOrderStart = 0
    }
}
