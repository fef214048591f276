import GraftModels
import GraftTensor

/// Shared switches of one named adapter: whether it is active, and whether adapters are disabled model-wide.
public final class AdapterState: @unchecked Sendable {
    /// The adapter takes part in forward passes.
    public var isActive: Bool = true
    /// The name of the adapter this state belongs to (set when the adapter is added to a model).
    public internal(set) var adapterName = ""
    /// Dropout and other training-only behaviour is on.
    public var isTraining: Bool = false
    /// The adapter's weights are currently merged into the base weights (its forward is then skipped).
    public var isMerged: Bool = false
    /// RNG for dropout and random initialization.
    public var rng: GraftRNG
    /// Per-example task ids for task-routed methods (Poly / MHR), PEFT's `task_ids=` forward argument; set with
    /// ``AdaptedModel/setTaskIDs(_:)``. Nil routes every example to task 0.
    public var taskIDs: [Int]?
    /// Each adapted Linear's position among the adapter's targets in module order, for methods that seed or group
    /// per layer as PEFT numbers them (TinyLoRA); filled by such factories' `sharedTensors`.
    public var targetIndex: [ObjectIdentifier: Int] = [:]
    /// Integer tables a factory computes once for all of the adapter's layers (UniLoRA's index assignment), by name.
    public var integerTables: [String: [Int32]] = [:]
    /// Trainable tensors a factory shares between layers that PEFT saves under each layer's own keys (Lily's A and B).
    public var sharedParameters: [String: Tensor] = [:]
    /// Objects a method shares between its layers and its model-level parts (X-LoRA's classifier and scalings),
    /// by name.
    public var methodObjects: [String: AnyObject] = [:]

    /// Creates the state with a seed for its RNG.
    public init(seed: UInt64) {
        rng = GraftRNG(seed: seed)
    }
}

/// One adapter method attached to one Linear layer: its parameters under PEFT's key names, its forward, and
/// (for weight-delta methods) the ΔW used to merge it.
public protocol LinearAdapterMethod: LinearAdapter {
    /// The named adapter this layer belongs to.
    var state: AdapterState { get }
    /// Parameters by PEFT key suffix (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`).
    var namedParameters: [(name: String, tensor: Tensor)] { get }
    /// The weight change `[out, in]` this adapter applies, for merging; nil when the method cannot merge.
    func deltaWeight(base: Linear) -> Tensor?
    /// The bias change `[out]` a merge applies (IA³ scales the bias); nil for none.
    func deltaBias(base: Linear) -> Tensor?
    /// Replaces a parameter's values from a loaded state dict; throws naming the key and both shapes on mismatch.
    func load(_ name: String, from tensor: Tensor) throws
    /// Integer buffers saved with the adapter (SHiRA's indices) by PEFT key suffix; none by default.
    var integerBuffers: [(name: String, values: [Int32], shape: [Int])] { get }
    /// Frozen float tensors PEFT saves under this layer's keys (RandLoRA's per-layer copies of its bases);
    /// written on save, checked for presence on load, never trained. None by default.
    var savedBuffers: [(name: String, tensor: Tensor)] { get }
    /// Restores an integer buffer; the default rejects any.
    func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws
    /// Restores a frozen tensor listed in ``savedBuffers`` from a loaded file (asymmetric LoRA's random A). The
    /// default ignores it (RandLoRA's copies of shared bases, which are loaded as shared tensors).
    func loadBuffer(_ name: String, from tensor: Tensor) throws
}

extension LinearAdapterMethod {
    public func deltaBias(base: Linear) -> Tensor? { nil }

    public var integerBuffers: [(name: String, values: [Int32], shape: [Int])] { [] }
    public var savedBuffers: [(name: String, tensor: Tensor)] { [] }

    /// Copies `tensor` into the parameter of that PEFT name, checking the shape.
    public func load(_ name: String, from tensor: Tensor) throws {
        guard let target = namedParameters.first(where: { $0.name == name })?.tensor else {
            throw GraftError.format("unknown \(Self.self) tensor '\(name)' (expected \(namedParameters.map(\.name).joined(separator: ", ")))")
        }
        try copyParameter(name, into: target, from: tensor)
    }

    public func loadIntegers(_ name: String, values: [Int64], shape: [Int]) throws {
        throw GraftError.format("unexpected integer tensor '\(name)' for this adapter method")
    }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {}

    /// Active and not merged.
    public var isEnabled: Bool { state.isActive && !state.isMerged }

    /// Copies `tensor` into the parameter called `name` after checking its shape.
    func copyParameter(_ name: String, into target: Tensor, from tensor: Tensor) throws {
        guard target.shape == tensor.shape else {
            throw GraftError.format("adapter tensor '\(name)' has shape \(tensor.shape), the layer expects \(target.shape)")
        }
        target.pointer.update(from: tensor.pointer, count: target.count)
    }
}

/// Inverted dropout with probability `p` while training (identity otherwise), recorded for autograd.
func dropout(_ x: Tensor, p: Float, state: AdapterState) -> Tensor {
    guard p > 0, state.isTraining else { return x }
    let keep = 1 - p
    let mask = Tensor(zeros: x.shape)
    let pm = mask.pointer
    for i in 0..<mask.count { pm[i] = state.rng.nextUniform() < keep ? 1 / keep : 0 }
    return x * mask
}

/// Kaiming-uniform initialization with a = √5 on a `[rows, cols]` matrix, as `nn.init.kaiming_uniform_`
/// (bound 1/√cols), which PEFT uses for most adapter matrices.
func kaimingUniform(_ rows: Int, _ cols: Int, rng: inout GraftRNG) -> Tensor {
    let bound = 1 / Float(max(cols, 1)).squareRoot()
    return Tensor.randomUniform([rows, cols], low: -bound, high: bound, rng: &rng)
}

/// A method whose update is a weight delta it forms in full (LoHa, LoKr, SHiRA): `y = W x + b + ΔW x`.
protocol DenseDeltaMethod: LinearAdapterMethod {
    /// ΔW `[out, in]`, recorded for autograd.
    func delta() -> Tensor
}

extension DenseDeltaMethod {
    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor { y + linear(x, delta()) }
    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { delta() } }
}
