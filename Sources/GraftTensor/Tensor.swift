/// A dense, contiguous, row-major Float32 tensor that can take part in reverse-mode autograd.
///
/// Tensors are reference types: ``reshaped(_:)`` shares storage, every other op allocates its result.
/// A tensor whose ``requiresGrad`` is true is either a trainable parameter (a leaf) or a value computed
/// from one (it then has a node on the autograd graph). Frozen weights and their results record nothing.
public final class Tensor: @unchecked Sendable {
    /// Dimensions, outermost first.
    public let shape: [Int]
    /// The storage; may be shared with reshaped views.
    public let storage: TensorBuffer
    /// Whether gradients flow to this tensor (a trainable leaf or a tracked intermediate).
    public internal(set) var requiresGrad: Bool
    /// The accumulated gradient of a trainable leaf after ``backward(_:)``; nil for frozen tensors.
    public var grad: Tensor?
    /// The Hugging Face parameter name, for parameters.
    public var name: String?
    /// The operation that produced this tensor, when it is tracked.
    var node: GradNode?

    /// Creates a tensor over existing storage. `storage.count` must equal the product of `shape`.
    public init(shape: [Int], storage: TensorBuffer) {
        self.shape = shape
        self.storage = storage
        self.requiresGrad = false
    }

    /// Creates a zero-filled tensor.
    public convenience init(zeros shape: [Int]) {
        self.init(shape: shape, storage: TensorBuffer(count: Tensor.elementCount(shape)))
    }

    /// Creates a tensor whose contents are unspecified; for op outputs that are written in full.
    convenience init(uninitialized shape: [Int]) {
        self.init(shape: shape, storage: TensorBuffer(count: Tensor.elementCount(shape), zeroed: false))
    }

    /// Creates a tensor holding a copy of `values`; `values.count` must equal the product of `shape`.
    public convenience init(shape: [Int], values: [Float]) {
        let n = Tensor.elementCount(shape)
        precondition(values.count == n, "Tensor(shape: \(shape)) given \(values.count) values")
        let buffer = values.withUnsafeBufferPointer { TensorBuffer(copying: $0) }
        self.init(shape: shape, storage: buffer)
    }

    /// Creates a tensor filled with `value`.
    public convenience init(repeating value: Float, shape: [Int]) {
        self.init(zeros: shape)
        storage.pointer.update(repeating: value, count: count)
    }

    /// A scalar (shape `[]`).
    public convenience init(scalar: Float) {
        self.init(shape: [], values: [scalar])
    }

    /// Product of the dimensions of `shape` (1 for a scalar).
    @inlinable public static func elementCount(_ shape: [Int]) -> Int {
        shape.reduce(1, *)
    }

    /// Number of elements.
    @inlinable public var count: Int { storage.count }
    /// Number of dimensions.
    @inlinable public var rank: Int { shape.count }
    /// The first element.
    @inlinable public var pointer: UnsafeMutablePointer<Float> { storage.pointer }
    /// The elements as a mutable buffer.
    @inlinable public var buffer: UnsafeMutableBufferPointer<Float> { storage.buffer }
    /// A copy of the elements.
    public var scalars: [Float] { Array(storage.buffer) }
    /// The single element of a one-element tensor.
    public var item: Float { storage.pointer[0] }

    /// The last dimension (1 for a scalar).
    @inlinable public var lastDim: Int { shape.last ?? 1 }
    /// The number of rows when viewed as a matrix `[count / lastDim, lastDim]`.
    @inlinable public var rows: Int { lastDim == 0 ? 0 : count / lastDim }

    /// Marks this tensor as a trainable leaf parameter (or freezes it) and returns it.
    @discardableResult
    public func requiringGrad(_ flag: Bool = true) -> Tensor {
        requiresGrad = flag
        if !flag { grad = nil }
        node = nil
        return self
    }

    /// A detached copy: same values, new storage, no autograd history.
    public func copy() -> Tensor {
        Tensor(shape: shape, storage: TensorBuffer(copying: UnsafeBufferPointer(storage.buffer)))
    }

    /// The same storage with no autograd history.
    public func detached() -> Tensor {
        Tensor(shape: shape, storage: storage)
    }
}

extension Tensor: CustomStringConvertible {
    public var description: String {
        let preview = storage.buffer.prefix(6).map { String(format: "%.4f", $0) }.joined(separator: ", ")
        return "Tensor(\(shape)\(requiresGrad ? ", grad" : ""): [\(preview)\(count > 6 ? ", ..." : "")])"
    }
}

extension String {
    init(format: String, _ value: Float) {
        // Minimal %.Nf formatting without Foundation.
        let digits = Int(format.dropFirst(2).dropLast()) ?? 4
        var v = Double(value)
        if v.isNaN { self = "nan"; return }
        if v.isInfinite { self = v > 0 ? "inf" : "-inf"; return }
        let negative = v < 0
        v = abs(v)
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let scaled = (v * scale).rounded()
        let intPart = (scaled / scale).rounded(.down)
        let frac = Int(scaled - intPart * scale)
        var fracString = String(frac)
        while fracString.count < digits { fracString = "0" + fracString }
        self = (negative ? "-" : "") + String(Int(intPart)) + (digits > 0 ? "." + fracString : "")
    }
}
