import GraftTensor

/// Keys and values of earlier positions, per layer, for incremental decoding of one sequence (inference only).
///
/// Each layer keeps its keys and values in one block that holds ``capacity`` positions, so a decode step
/// appends in place instead of copying the whole history. A cache made with a capacity (a server's per-sequence
/// cache) allocates it once, up front; a cache made without one starts small and doubles when full.
public final class KVCache {
    /// One layer's keys and values: the first ``length`` rows of `[capacity, width]` blocks.
    public final class Layer {
        private var keyBlock: TensorBuffer?
        private var valueBlock: TensorBuffer?
        /// Positions stored.
        public private(set) var length = 0
        /// Positions the blocks hold before they must grow.
        public private(set) var capacity: Int
        /// Floats per position (`kvHeads · headDim`), fixed by the first append when not given.
        public private(set) var width: Int
        /// Whether the blocks may grow past ``capacity``.
        let growable: Bool

        init(width: Int, capacity: Int, growable: Bool) {
            self.width = width
            self.capacity = capacity
            self.growable = growable
            if width > 0 && capacity > 0 { allocate(capacity) }
        }

        /// The stored keys `[1, length, width]` (a view: valid until the next append).
        var keys: Tensor? { view(keyBlock) }
        /// The stored values `[1, length, width]` (a view: valid until the next append).
        var values: Tensor? { view(valueBlock) }

        /// Bytes held by the blocks.
        var allocatedBytes: Int { (keyBlock?.count ?? 0) * 4 + (valueBlock?.count ?? 0) * 4 }

        private func view(_ block: TensorBuffer?) -> Tensor? {
            guard let block, length > 0 else { return nil }
            return Tensor(shape: [1, length, width], storage: TensorBuffer(viewing: block, offset: 0, count: length * width))
        }

        private func allocate(_ positions: Int) {
            let keys = TensorBuffer(count: positions * width, zeroed: false)
            let values = TensorBuffer(count: positions * width, zeroed: false)
            if let old = keyBlock, let oldValues = valueBlock, length > 0 {
                keys.pointer.update(from: old.pointer, count: length * width)
                values.pointer.update(from: oldValues.pointer, count: length * width)
            }
            keyBlock = keys
            valueBlock = values
            capacity = positions
        }

        /// Appends `count` positions from `keys` and `values` (`count · width` floats each, row-major), growing the
        /// blocks when full (a fixed-capacity cache is checked by ``KVCache/reserve(_:)`` before the pass).
        func append(keys: UnsafePointer<Float>, values: UnsafePointer<Float>, count: Int, width w: Int) {
            guard count > 0 else { return }
            if width == 0 || keyBlock == nil { width = w }
            if length + count > capacity || keyBlock == nil {
                allocate(max(length + count, growable ? max(2 * capacity, 64) : capacity))
            }
            guard let k = keyBlock, let v = valueBlock else { return }
            (k.pointer + length * width).update(from: keys, count: count * width)
            (v.pointer + length * width).update(from: values, count: count * width)
            length += count
        }

        /// Appends the `[1, n, width]` keys and values of one row.
        func append(keys: Tensor, values: Tensor) {
            let w = keys.shape.last ?? 0
            append(keys: keys.pointer, values: values.pointer, count: w == 0 ? 0 : keys.count / w, width: w)
        }

        /// Keeps only the first `positions` positions.
        func truncate(to positions: Int) {
            length = min(length, max(positions, 0))
        }

        /// Copies the first `positions` positions of `other` into this empty layer.
        func copyPrefix(of other: Layer, positions: Int) {
            guard positions > 0, let k = other.keyBlock, let v = other.valueBlock else { return }
            append(keys: k.pointer, values: v.pointer, count: min(positions, other.length), width: other.width)
        }
    }

    /// The layers' caches.
    public let layers: [Layer]
    /// Number of positions cached.
    public internal(set) var length: Int = 0
    /// The most positions the cache holds; nil when it grows as needed.
    public let capacity: Int?
    /// Small values adapters keep with the cached sequence, keyed by the adapter object (aLoRA: whether the
    /// prompt held its invocation sequence, which decides whether it acts on every later token).
    public var adapterMarks: [ObjectIdentifier: Int] = [:]
    /// The route a dynamic-depth policy chose for the cached sequence (per layer, how many times it ran: Dr.LLM's
    /// 0 skip, 1 execute, 2 repeat), fixed by its first pass and kept by every later one; nil without a policy.
    /// Copied with a prefix (``copyPrefix(of:positions:)``), since the copied keys and values were made under it.
    public var layerRoutes: [Int]?
    /// Keys and values of a layer's second and later executions in one pass (a repeated layer), keyed by
    /// `execution · layers.count + layer`; made on first use (``layer(_:execution:)``).
    private var executionLayers: [Int: Layer] = [:]

    /// An empty cache for `layerCount` layers that grows as positions are added.
    public init(layerCount: Int) {
        layers = (0..<layerCount).map { _ in Layer(width: 0, capacity: 0, growable: true) }
        capacity = nil
    }

    /// A cache for `layerCount` layers of `width` floats per position (`kvHeads · headDim`) that holds at most
    /// `capacity` positions, all allocated now; appending past it throws.
    public init(layerCount: Int, width: Int, capacity: Int) {
        layers = (0..<layerCount).map { _ in Layer(width: width, capacity: max(capacity, 1), growable: false) }
        self.capacity = max(capacity, 1)
    }

    /// Throws when `positions` more would not fit a fixed capacity, naming both numbers.
    public func reserve(_ positions: Int) throws {
        if let capacity, length + positions > capacity {
            throw GraftError.invalid("the KV cache holds \(capacity) positions (the context limit): \(length) cached + \(positions) new do not fit")
        }
    }

    /// Bytes the cache's blocks hold.
    public var allocatedBytes: Int {
        layers.reduce(0) { $0 + $1.allocatedBytes } + executionLayers.values.reduce(0) { $0 + $1.allocatedBytes }
    }

    /// The cache of layer `index`'s `execution`-th run in one pass (0: the layer's own, ``layers``; 1: the second
    /// run of a repeated layer, and so on), made on first use with this cache's capacity. A repeated layer's runs
    /// attend to their own keys and values: run `e` at a position reads run `e` at earlier positions.
    public func layer(_ index: Int, execution: Int) -> Layer {
        if execution == 0 { return layers[index] }
        let key = execution * layers.count + index
        if let existing = executionLayers[key] { return existing }
        let made = capacity.map { Layer(width: layers[index].width, capacity: $0, growable: false) }
            ?? Layer(width: 0, capacity: 0, growable: true)
        executionLayers[key] = made
        return made
    }

    /// Makes this empty cache continue `other`'s first `positions` positions (a shared prompt prefix): copies
    /// those keys and values in every layer, and in every repeated layer's later runs with the dynamic-depth route
    /// they were made under (``layerRoutes``). Adapter marks are not copied.
    public func copyPrefix(of other: KVCache, positions: Int) throws {
        guard length == 0, other.layers.count == layers.count else {
            throw GraftError.invalid("KV cache: a prefix is copied into an empty cache of the same layer count")
        }
        let n = min(positions, other.length)
        for (mine, theirs) in zip(layers, other.layers) { mine.copyPrefix(of: theirs, positions: n) }
        for (key, theirs) in other.executionLayers.sorted(by: { $0.key < $1.key }) {
            layer(key % layers.count, execution: key / layers.count).copyPrefix(of: theirs, positions: n)
        }
        layerRoutes = other.layerRoutes
        length = n
    }
}
