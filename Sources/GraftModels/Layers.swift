import GraftTensor

/// Something attached to a ``Linear`` that changes its output: LoRA and the rest of the adapter catalog.
///
/// The base weight is never rewritten: `Linear.forward` computes the base projection, then passes it through
/// each enabled adapter in order.
public protocol LinearAdapter: AnyObject {
    /// Whether the adapter currently takes part in forward passes.
    var isEnabled: Bool { get }
    /// Returns the adapted output given the layer's input `x` and its base output `y`.
    func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor
    /// Changes the input before the base projection (IA³ on feed-forward layers scales it); identity by default.
    func transformInput(_ x: Tensor, layer: Linear) -> Tensor
    /// Whether one sequence's output depends on the other sequences of its batch (a router averaged over the
    /// batch, an expert capacity counted over its tokens); mixed-adapter batches then run such an adapter one
    /// sequence at a time, so each row gets what it gets alone. False by default.
    var couplesRows: Bool { get }
    /// Adds the adapter's update for input `x` to `y` in place and returns true, or returns false (the default)
    /// to have the layer call ``forward(input:baseOutput:layer:)`` instead. Called only while gradients are not
    /// recorded, with `y` the layer's own fresh output `[x.rows, outFeatures]`: inference skips the tensors
    /// and threads a recorded forward needs (a decode step runs a few hundred adapted products per token).
    func addInPlace(input x: Tensor, into y: Tensor, layer: Linear) -> Bool
    /// A decoding step's update (gradients off; `x` a row or two, or a row or two per sequence of a mixed-adapter
    /// batch): the pieces of work that need the whole input and what adds the rest into a range of output rows,
    /// both of which the layer runs inside its base product's threads (one dispatch per layer instead of one per
    /// product); or nil (the default) to be called through ``addInPlace(input:into:layer:)``. An adapter that
    /// returns one must leave the input untransformed.
    func decodeUpdate(input x: Tensor, layer: Linear) -> DecodingUpdate?
}

extension LinearAdapter {
    public func transformInput(_ x: Tensor, layer: Linear) -> Tensor { x }
    public var couplesRows: Bool { false }
    public func addInPlace(input x: Tensor, into y: Tensor, layer: Linear) -> Bool { false }
    public func decodeUpdate(input x: Tensor, layer: Linear) -> DecodingUpdate? { nil }
}

/// `y = x Wᵀ + b` with Hugging Face's `[out, in]` weight layout. The weight is frozen unless made trainable.
public final class Linear: Module {
    /// Where the weight lives: a float32 tensor, or a frozen compact matrix (a quantized GGUF weight).
    private enum WeightStorage {
        case dense(Tensor)
        case compact(any FrozenMatrix)
    }
    private var storage: WeightStorage
    /// `[outFeatures, inFeatures]`. For a layer whose weight is kept compact (``compactWeight``) every read
    /// decodes a fresh float32 copy (changes to it are not kept): read it once where it is needed, and write
    /// through ``setWeight(_:)`` or after ``makeWeightDense()``.
    public var weight: Tensor {
        switch storage {
        case .dense(let tensor): return tensor
        case .compact(let matrix): return matrix.dequantized()
        }
    }
    /// `[outFeatures]`, if the layer has a bias.
    public private(set) var bias: Tensor?
    /// Input width.
    public let inFeatures: Int
    /// Output width.
    public let outFeatures: Int
    /// Adapters attached to this layer, applied in order.
    public var adapters: [any LinearAdapter] = []
    /// The number format of the base product while the weight is frozen (``ComputeDType/resolved`` values only:
    /// float32 or bfloat16). A trainable weight always runs in float32.
    public var computeDType: ComputeDType = .float32 {
        didSet { if computeDType != .bfloat16 { narrowWeight = nil } }
    }
    /// The bfloat16 copy of the weight, made on first use in bfloat16 mode and dropped when the weight changes.
    private var narrowWeight: BFloat16Matrix?

    /// Creates a layer over existing tensors.
    public init(weight: Tensor, bias: Tensor?) {
        storage = .dense(weight)
        self.bias = bias
        self.outFeatures = weight.shape[0]
        self.inFeatures = weight.shape[1]
        super.init(typeName: "Linear")
        register(parameter: "weight", weight)
        if let bias { register(parameter: "bias", bias) }
    }

    /// Creates a layer whose frozen weight stays in a compact format (`[rows, cols]` = `[out, in]`) and is decoded
    /// tile by tile inside its products.
    public init(compact weight: any FrozenMatrix, bias: Tensor?) {
        storage = .compact(weight)
        self.bias = bias
        self.outFeatures = weight.rows
        self.inFeatures = weight.cols
        super.init(typeName: "Linear")
        if let bias { register(parameter: "bias", bias) }
    }

    /// The compact frozen weight, or nil when the weight is a float32 tensor.
    public var compactWeight: (any FrozenMatrix)? {
        if case .compact(let matrix) = storage { return matrix }
        return nil
    }

    /// Whether the weight is trainable (a compact weight never is).
    public var weightRequiresGrad: Bool {
        if case .dense(let tensor) = storage { return tensor.requiresGrad }
        return false
    }

    /// Decodes a compact weight into a float32 tensor the layer keeps from now on (for merging adapters into
    /// it, or training it); nothing when it already is one.
    public func makeWeightDense() {
        guard case .compact(let matrix) = storage else { return }
        setWeight(matrix.dequantized())
    }

    /// Replaces the weight (merge/unmerge write new values through this).
    public func setWeight(_ w: Tensor) {
        let wasCompact = compactWeight != nil
        storage = .dense(w)
        narrowWeight = nil
        if wasCompact { register(parameter: "weight", w) } else { replaceParameter("weight", with: w) }
    }

    /// Replaces the bias.
    public func setBias(_ b: Tensor?) {
        bias = b
        if let b { replaceParameter("bias", with: b) }
    }

    /// A compact weight as a parameter decoded on demand.
    public override var compactParameters: [(name: String, shape: [Int], source: AnyObject, decode: () -> Tensor)] {
        guard case .compact(let matrix) = storage else { return [] }
        return [("weight", [matrix.rows, matrix.cols], matrix, { matrix.dequantized() })]
    }

    /// The base projection followed by every enabled adapter.
    public func forward(_ x: Tensor) -> Tensor {
        if let fused = fusedDecodeForward(x) { return fused }
        var input = x
        for adapter in adapters where adapter.isEnabled { input = adapter.transformInput(input, layer: self) }
        var y = baseForward(input)
        // The base output is this layer's own until it returns, so inference may add updates into it (not into
        // an output another adapter returned, which that adapter may keep).
        var ownsOutput = !GradMode.isEnabled
        for adapter in adapters where adapter.isEnabled {
            if ownsOutput && adapter.addInPlace(input: x, into: y, layer: self) { continue }
            y = adapter.forward(input: x, baseOutput: y, layer: self)
            ownsOutput = false
        }
        return y
    }

    /// A decoding step on a compact weight whose enabled adapters all add their updates inside the base product's
    /// threads (``LinearAdapter/decodeUpdate(input:layer:)``), or nil when any of that does not hold.
    private func fusedDecodeForward(_ x: Tensor) -> Tensor? {
        guard !GradMode.isEnabled, computeDType != .bfloat16, case .compact(let matrix) = storage,
              adapters.contains(where: \.isEnabled) else { return nil }
        var updates: [DecodingUpdate] = []
        for adapter in adapters where adapter.isEnabled {
            guard let update = adapter.decodeUpdate(input: x, layer: self) else { return nil }
            updates.append(update)
        }
        return linear(x, frozen: matrix, bias, update: DecodingUpdate.combined(updates))
    }

    /// The bfloat16 copy products with the weight use, or nil when they run in float32 (float32 mode, or a
    /// trainable weight).
    public var frozenNarrowWeight: BFloat16Matrix? {
        guard computeDType == .bfloat16, !weightRequiresGrad else { return nil }
        let narrow = narrowWeight ?? BFloat16Matrix(weight)
        narrowWeight = narrow
        return narrow
    }

    /// `x · Wᵀ + b` in the layer's compute format.
    public func baseForward(_ x: Tensor) -> Tensor {
        if let narrow = frozenNarrowWeight {
            // bfloat16 products need the float32 weight only for its shape and gradient bookkeeping.
            switch storage {
            case .dense(let tensor): return linear(x, tensor, narrow: narrow, bias)
            case .compact: return linear(x, narrow: narrow, bias)
            }
        }
        switch storage {
        case .dense(let tensor): return linear(x, tensor, bias)
        case .compact(let matrix): return linear(x, frozen: matrix, bias)
        }
    }

    public override var summary: String {
        "in_features=\(inFeatures), out_features=\(outFeatures), bias=\(bias != nil)"
    }
}

/// Sees the tokens of every forward pass before the layers run, so an adapter can act on some tokens only
/// (aLoRA activates from its invocation sequence on).
public protocol TokenObserver: AnyObject {
    /// Whether the observer takes part in forward passes.
    var isEnabled: Bool { get }
    /// `batch` is about to run through the layers, whose Linear modules see its rows as `[batch, length, ·]`.
    /// `caches[r]` is row `r`'s KV cache when the row starts or continues a cached sequence (its
    /// ``KVCache/length`` still the positions cached before this pass), nil when nothing is cached.
    func willRun(_ batch: TokenBatch, caches: [KVCache?])
}

/// A model whose forward passes show their tokens to ``TokenObserver``s first (the Llama decoder).
public protocol TokenObserverHost: AnyObject {
    /// The observers, called in order before every pass.
    var tokenObservers: [any TokenObserver] { get set }
    /// The module-path prefix of the layers whose Linear modules see the observed rows one to one (a decoder's
    /// `model.layers.`; the LM head, which sees chosen rows only, lies outside it).
    var tokenAlignedPrefix: String { get }
}

/// Something attached to a ``LayerNorm`` that supplies its own scale and shift (PEFT's LN tuning).
public protocol NormAdapter: AnyObject {
    /// Whether the adapter currently takes part in forward passes.
    var isEnabled: Bool { get }
    /// The scale and shift to use instead of the layer's own.
    var weight: Tensor { get }
    /// The shift (nil keeps none).
    var bias: Tensor? { get }
}

/// Virtual tokens prepended to every sequence's input embeddings (prompt tuning, P-tuning).
public protocol PromptAdapter: AnyObject {
    /// Whether the adapter currently takes part in forward passes.
    var isEnabled: Bool { get }
    /// The virtual token embeddings `[virtualTokens, hidden]`, recorded for autograd.
    func virtualTokens() -> Tensor
    /// The virtual tokens of each of `rows` sequences, `[rows, virtualTokens, hidden]`, recorded: the same for
    /// every row by default; per-row for methods that pick them by each example's task (multitask prompt tuning).
    func virtualTokens(rows: Int) -> Tensor
}

extension PromptAdapter {
    public func virtualTokens(rows: Int) -> Tensor {
        let prompt = virtualTokens()
        let n = prompt.shape[0], width = prompt.shape[prompt.rank - 1]
        return concat([Tensor](repeating: prompt.reshaped([1, n, width]), count: rows), dim: 0)
    }
}

/// A model that prepends enabled prompt adapters' virtual tokens to its input (BERT, Llama).
public protocol PromptHost: AnyObject {
    /// The prompt adapters; the first enabled one is used.
    var promptAdapters: [any PromptAdapter] { get set }
    /// The width of the input embeddings (the virtual tokens' width).
    var embeddingWidth: Int { get }
}

/// Learned keys and values prepended to every attention layer (prefix tuning).
public protocol PrefixAdapter: AnyObject {
    /// Whether the adapter currently takes part in forward passes.
    var isEnabled: Bool { get }
    /// Layer `layer`'s prefix keys and values, each `[virtualTokens, kvHeads * headDim]`, recorded.
    func prefix(layer: Int) -> (keys: Tensor, values: Tensor)
}

/// A model whose attention layers take prefix keys and values (BERT, Llama).
public protocol PrefixHost: PromptHost {
    /// The prefix adapters; the first enabled one is used.
    var prefixAdapters: [any PrefixAdapter] { get set }
    /// Attention layers.
    var prefixLayerCount: Int { get }
    /// Width of one layer's keys (and values): `kvHeads · headDim` (the hidden size without grouped-query
    /// attention).
    var prefixWidth: Int { get }
}

/// LayerNorm over the last dimension with a learned scale and shift.
public final class LayerNorm: Module {
    /// Scale, `[dim]`.
    public private(set) var weight: Tensor
    /// Shift, `[dim]`.
    public private(set) var bias: Tensor
    /// Added to the variance.
    public let eps: Float

    /// Creates a norm over existing tensors.
    public init(weight: Tensor, bias: Tensor, eps: Float) {
        self.weight = weight
        self.bias = bias
        self.eps = eps
        super.init(typeName: "LayerNorm")
        register(parameter: "weight", weight)
        register(parameter: "bias", bias)
    }

    /// Adapters that replace the scale and shift; the first enabled one is used.
    public var adapters: [any NormAdapter] = []

    /// Normalizes `x`.
    public func forward(_ x: Tensor) -> Tensor {
        if let a = adapters.first(where: { $0.isEnabled }) { return layerNorm(x, weight: a.weight, bias: a.bias, eps: eps) }
        return layerNorm(x, weight: weight, bias: bias, eps: eps)
    }

    public override var summary: String { "(\(weight.count),), eps=\(eps)" }
}

/// RMSNorm with a learned scale (Llama's `LlamaRMSNorm`).
public final class RMSNorm: Module {
    /// Scale, `[dim]`.
    public private(set) var weight: Tensor
    /// Added to the mean square.
    public let eps: Float

    /// Creates a norm over an existing tensor.
    public init(weight: Tensor, eps: Float) {
        self.weight = weight
        self.eps = eps
        super.init(typeName: "LlamaRMSNorm")
        register(parameter: "weight", weight)
    }

    /// Adapters that replace the scale; the first enabled one is used.
    public var adapters: [any NormAdapter] = []

    /// Normalizes `x`.
    public func forward(_ x: Tensor) -> Tensor {
        if let a = adapters.first(where: { $0.isEnabled }) { return rmsNorm(x, weight: a.weight, eps: eps) }
        return rmsNorm(x, weight: weight, eps: eps)
    }

    public override var summary: String { "(\(weight.count),), eps=\(eps)" }
}

/// Where in a transformer layer a ``LayerAdapter`` acts.
public enum LayerSite: Sendable {
    /// The attention block's output projection, before the residual add (and, in BERT, its LayerNorm).
    case attention
    /// The feed-forward block's output projection, before the residual add (and, in BERT, its LayerNorm).
    case feedForward
    /// The layer's output hidden state (the residual stream after the layer).
    case output
}

/// A module inserted into a transformer layer's data flow (bottleneck adapters, ReFT interventions).
public protocol LayerAdapter: AnyObject {
    /// Whether the adapter currently takes part in forward passes.
    var isEnabled: Bool { get }
    /// The replacement for `output`, the `[batch, length, hidden]` result at `site`. `input` is what that
    /// sublayer read (the normed hidden state attention or the feed-forward block saw; for `.output`, the layer's
    /// input). `mask` describes the batch (real lengths, packed segments, the KV-cache offset).
    func forward(site: LayerSite, output: Tensor, input: Tensor, mask: AttentionMask) -> Tensor
}

/// Passes `output` through every enabled adapter in order (the identity when none is attached).
@inline(__always)
func applyLayerAdapters(_ adapters: [any LayerAdapter], site: LayerSite, output: Tensor, input: Tensor,
                        mask: AttentionMask) -> Tensor {
    guard !adapters.isEmpty else { return output }
    var y = output
    for a in adapters where a.isEnabled { y = a.forward(site: site, output: y, input: input, mask: mask) }
    return y
}

/// A transformer layer that runs ``LayerAdapter``s (BERT's and Llama's layers).
public protocol LayerAdapterHost: AnyObject {
    /// The adapters, applied in order at each ``LayerSite``.
    var layerAdapters: [any LayerAdapter] { get set }
    /// Width of the residual stream.
    var hiddenSize: Int { get }
}

extension Module {
    /// Sets every Linear layer below this module (itself included) to multiply its frozen weight in `dtype`
    /// (``ComputeDType/auto`` resolved for this machine); returns the format in effect.
    @discardableResult
    public func setComputeDType(_ dtype: ComputeDType) -> ComputeDType {
        let resolved = dtype.resolved
        for (_, module) in namedModules() { (module as? Linear)?.computeDType = resolved }
        return resolved
    }
}
