import GraftModels
import GraftTensor

/// SparseAdapter (He et al., 2022): a bottleneck adapter (`SEQ_BN`, `DOUBLE_SEQ_BN` or `PAR_BN`, chosen by
/// `variant`) whose weight matrices are pruned at initialisation by SNIP: after the first backward of training
/// (through ``AdapterTrainingHook``, before the first update) each `adapter_down` / `adapter_up` weight keeps the
/// `⌈(1 − sparsity) · size⌉` entries of largest connection sensitivity |w · ∂L/∂w| and the rest become 0 for good
/// (the forward multiplies by the mask, so they get no gradient; their first-step gradient is cleared). Biases are
/// not pruned. The ranking is per matrix (Graft's choice: every matrix keeps exactly its share).
///
/// SNIP needs nonzero weights on both sides of the bottleneck: `W_up` starts from N(0, `init_std`²) (default
/// 0.01, near-identity like Houlsby's initialisation) instead of zeros, so a fresh adapter changes the base model
/// slightly. `large_sparse: true` is the paper's Large-Sparse setting: the bottleneck widens by 1/(1 − sparsity)
/// so the kept weights match a dense adapter at `reduction_factor`. Keys: the bottleneck adapter's, plus its
/// masks `<site>.adapter_down.mask` / `<site>.adapter_up.mask` (float 0/1, all ones before pruning). Graft's own
/// method: PEFT has no SparseAdapter.
public final class SparseAdapterLayer: ModuleAdapterMethod, LayerAdapter, AdapterTrainingHook {
    /// The bottleneck adapter being pruned.
    public let inner: BottleneckAdapterLayer
    /// Fraction of each weight matrix pruned.
    public let sparsity: Double
    /// The masks (1 kept, 0 pruned), by parameter name; nil before pruning.
    public private(set) var masks: [String: Tensor]?

    public var state: AdapterState { inner.state }

    init(inner: BottleneckAdapterLayer, sparsity: Double, initStd: Float) {
        self.inner = inner
        self.sparsity = sparsity
        for (_, w) in prunable where w.shape[0] == inner.host.hiddenSize {  // adapter_up: [hidden, bottleneck]
            var rng = inner.state.rng
            let values = Tensor.randomNormal(w.shape, std: initStd, rng: &rng)
            inner.state.rng = rng
            w.pointer.update(from: values.pointer, count: w.count)
        }
    }

    /// The weights SNIP prunes, by key name.
    var prunable: [(name: String, tensor: Tensor)] { inner.namedParameters.filter { $0.name.hasSuffix("_down.weight") || $0.name.hasSuffix("_up.weight") } }

    public var isEnabled: Bool { inner.isEnabled }
    public var mergeable: Bool { false }
    public var notMergeableReason: String { inner.notMergeableReason }
    public var namedParameters: [(name: String, tensor: Tensor)] { inner.namedParameters }

    public var exportedParameters: [(name: String, tensor: Tensor)] {
        namedParameters + prunable.map { (p: (name: String, tensor: Tensor)) in
            (p.name.replacingOccurrences(of: ".weight", with: ".mask"), masks?[p.name] ?? Tensor(repeating: 1, shape: p.tensor.shape))
        }
    }

    public func attach() { inner.host.layerAdapters.append(self) }
    public func detach() { inner.host.layerAdapters.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    public func load(_ name: String, from tensor: Tensor) throws {
        guard name.hasSuffix(".mask") else { return try inner.load(name, from: tensor) }
        let weightName = name.replacingOccurrences(of: ".mask", with: ".weight")
        guard let w = prunable.first(where: { $0.name == weightName })?.tensor else {
            throw GraftError.format("unknown SparseAdapter mask '\(name)'")
        }
        guard tensor.shape == w.shape else { throw GraftError.format("'\(name)' has shape \(tensor.shape), the layer expects \(w.shape)") }
        guard tensor.scalars.allSatisfy({ $0 == 0 || $0 == 1 }) else { throw GraftError.format("'\(name)' holds values other than 0 and 1") }
        if tensor.scalars.allSatisfy({ $0 == 1 }) { return }  // saved before pruning
        var m = masks ?? [:]
        m[weightName] = tensor.copy()
        masks = m
    }

    public func forward(site: LayerSite, output: Tensor, input: Tensor, mask: AttentionMask) -> Tensor {
        let block: BottleneckAdapterLayer.Block?, prefix: String
        switch site {
        case .attention: (block, prefix) = (inner.attention, "mh_adapter")
        case .feedForward: (block, prefix) = (inner.feedForward, "output_adapter")
        case .output: (block, prefix) = (nil, "")
        }
        guard let block else { return output }
        let down = masks?["\(prefix).adapter_down.weight"].map { block.down * $0 } ?? block.down
        let up = masks?["\(prefix).adapter_up.weight"].map { block.up * $0 } ?? block.up
        let z = inner.parallel ? input : output
        return output + linear(inner.activation(linear(z, down, block.downBias)), up, block.upBias) * inner.scaling
    }

    /// SNIP after the first backward: keeps the largest |w · ∂L/∂w| of each matrix, zeroes the rest.
    public func afterBackward(step: Int) {
        guard masks == nil else { return }
        var m: [String: Tensor] = [:]
        for (name, w) in prunable {
            let scores = Tensor(zeros: w.shape)
            if let g = w.grad { for i in 0..<w.count { scores.pointer[i] = abs(w.pointer[i] * g.pointer[i]) } }
            let keep = Int(((1 - sparsity) * Double(w.count)).rounded(.up))
            let mask = Tensor(zeros: w.shape)
            for i in topIndices(UnsafeBufferPointer(start: scores.pointer, count: w.count), count: keep) { mask.pointer[i] = 1 }
            for i in 0..<w.count where mask.pointer[i] == 0 {
                w.pointer[i] = 0
                w.grad?.pointer[i] = 0
            }
            m[name] = mask
        }
        masks = m
    }
}

/// SparseAdapter (`peft_type: "SPARSE_ADAPTER"`, no PEFT counterpart): `variant` (`"seq_bn"` default,
/// `"double_seq_bn"`, `"par_bn"`) with that adapter's keys and defaults (`reduction_factor`, `non_linearity`,
/// `scaling`, `mh_adapter`, `output_adapter`, `leave_out`), `sparsity` (fraction pruned, in [0, 1), default 0.4),
/// `large_sparse` (default false), `init_std` (of W_up, > 0, default 0.01).
public enum SparseAdapterFactory: ModuleAdapterFactory {
    public static let peftType = "SPARSE_ADAPTER"
    public static let family = "module (bottleneck adapter, SNIP-pruned)"
    public static var selectsLayers: Bool { true }
    public static var mergeable: Bool { false }
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["reduction_factor": 16, "sparsity": 0.4] }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let sparsity = try config.double("sparsity", default: 0.4)
        guard sparsity >= 0, sparsity < 1 else { throw GraftError.invalid("\(config.source): 'sparsity' must be in [0, 1), got \(sparsity)") }
        let initStd = try config.double("init_std", default: 0.01)
        guard initStd > 0, initStd.isFinite else { throw GraftError.invalid("\(config.source): 'init_std' must be positive, got \(initStd)") }
        let factory: any BottleneckFactory.Type
        switch (try config.string("variant") ?? "seq_bn").lowercased() {
        case "seq_bn": factory = BottleneckSequentialFactory.self
        case "double_seq_bn": factory = BottleneckDoubleSequentialFactory.self
        case "par_bn": factory = BottleneckParallelFactory.self
        case let other: throw GraftError.invalid("\(config.source): 'variant' '\(other)' is not one of seq_bn, double_seq_bn, par_bn")
        }
        var adjusted = config  // a copy shares the ledger of honoured keys
        if try config.bool("large_sparse", default: false) {
            // Wider by 1/(1 − sparsity): the kept weights match a dense adapter at reduction_factor.
            let reduction = try config.double("reduction_factor", default: Double(factory.defaults.reduction))
            guard reduction * (1 - sparsity) >= 1.0 / 16 else {
                throw GraftError.invalid("\(config.source): large_sparse with reduction_factor \(reduction) and sparsity \(sparsity) widens the bottleneck past 16× the hidden size")
            }
            adjusted.json["reduction_factor"] = reduction * (1 - sparsity)
        }
        let inner = try factory.make(for: module, path: path, config: adjusted, state: state)
        guard let inner = inner as? BottleneckAdapterLayer else { return nil }
        return SparseAdapterLayer(inner: inner, sparsity: sparsity, initStd: Float(initStd))
    }
}
