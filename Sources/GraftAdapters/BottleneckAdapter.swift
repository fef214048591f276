import Foundation
import GraftModels
import GraftTensor

/// Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020; He et al., 2022 — AdapterHub's `seq_bn`,
/// `double_seq_bn` and `par_bn`): a small MLP inserted into each transformer layer,
/// `o ← o + s·f(z W_downᵀ + b_down) W_upᵀ + b_up`, where `o` is the output of the attention block's and/or the
/// feed-forward block's output projection (before the residual add). Sequential adapters read `z = o`; parallel
/// ones read the sublayer's input `z` (the hidden state attention or the feed-forward block saw), running beside
/// it. `W_up`, `b_up` start at zero, so training starts at the base model. Not mergeable (the nonlinearity sits
/// outside the weights). Keys per layer, `<site>` = `mh_adapter` (attention) or `output_adapter` (feed-forward):
/// `<site>.adapter_down.weight` `[hidden/reduction, hidden]`, `.adapter_down.bias`, `<site>.adapter_up.weight`
/// `[hidden, hidden/reduction]`, `.adapter_up.bias`.
public final class BottleneckAdapterLayer: ModuleAdapterMethod, LayerAdapter {
    /// One inserted MLP.
    public struct Block {
        /// `[bottleneck, hidden]` and `[bottleneck]`.
        public let down: Tensor, downBias: Tensor
        /// `[hidden, bottleneck]` and `[hidden]`, zero at initialization.
        public let up: Tensor, upBias: Tensor
    }

    public let state: AdapterState
    /// The adapter after (or beside) attention, if any.
    public let attention: Block?
    /// The adapter after (or beside) the feed-forward block, if any.
    public let feedForward: Block?
    /// Parallel (reads the sublayer input) rather than sequential (reads its output).
    public let parallel: Bool
    /// The output multiplier `s`.
    public let scaling: Float
    let activation: (Tensor) -> Tensor
    let host: any LayerAdapterHost

    init(host: any LayerAdapterHost, bottleneck: Int, attention: Bool, feedForward: Bool, parallel: Bool, scaling: Float,
         activation: @escaping (Tensor) -> Tensor, state: AdapterState) {
        self.state = state
        self.host = host
        self.parallel = parallel
        self.scaling = scaling
        self.activation = activation
        let h = host.hiddenSize
        func block() -> Block {
            Block(down: kaimingUniform(bottleneck, h, rng: &state.rng).requiringGrad(), downBias: Tensor(zeros: [bottleneck]).requiringGrad(),
                  up: Tensor(zeros: [h, bottleneck]).requiringGrad(), upBias: Tensor(zeros: [h]).requiringGrad())
        }
        self.attention = attention ? block() : nil
        self.feedForward = feedForward ? block() : nil
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var mergeable: Bool { false }
    public var notMergeableReason: String { "a bottleneck adapter applies a nonlinearity outside the layer's weights" }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        var out: [(String, Tensor)] = []
        for (site, block) in [("mh_adapter", attention), ("output_adapter", feedForward)] {
            guard let block else { continue }
            out += [("\(site).adapter_down.weight", block.down), ("\(site).adapter_down.bias", block.downBias),
                    ("\(site).adapter_up.weight", block.up), ("\(site).adapter_up.bias", block.upBias)]
        }
        return out
    }

    public func attach() { host.layerAdapters.append(self) }
    public func detach() { host.layerAdapters.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    public func load(_ name: String, from tensor: Tensor) throws {
        try loadNamedParameter(name, from: tensor, hint: "reduction_factor")
    }

    public func forward(site: LayerSite, output: Tensor, input: Tensor, mask: AttentionMask) -> Tensor {
        let block: Block?
        switch site {
        case .attention: block = attention
        case .feedForward: block = feedForward
        case .output: block = nil
        }
        guard let block else { return output }
        let z = parallel ? input : output
        return output + linear(activation(linear(z, block.down, block.downBias)), block.up, block.upBias) * scaling
    }
}

/// The settings shared by the bottleneck factories, with AdapterHub's defaults per variant.
public protocol BottleneckFactory: ModuleAdapterFactory {
    /// Parallel (beside the sublayer) rather than sequential (after it).
    static var parallel: Bool { get }
    /// AdapterHub's defaults for this variant.
    static var defaults: (reduction: Int, scaling: Double, attention: Bool, feedForward: Bool, activation: String) { get }
}

extension BottleneckFactory {
    public static var family: String { parallel ? "module (parallel bottleneck adapter)" : "module (sequential bottleneck adapter)" }
    public static var selectsLayers: Bool { true }
    public static var mergeable: Bool { false }
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["reduction_factor": 16] }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        guard let host = module as? any LayerAdapterHost else { return nil }
        let leaveOut: [Int]
        switch config.value("leave_out") {
        case nil, is NSNull: leaveOut = []
        case let list as [Int]: leaveOut = list
        case let other?: throw GraftError.invalid("\(config.source): 'leave_out' must be a list of layer indices, got \(other)")
        }
        if let i = layerIndex(path), leaveOut.contains(i) { return nil }
        let reduction = try config.double("reduction_factor", default: Double(defaults.reduction))
        guard reduction > 0, reduction.isFinite, Double(host.hiddenSize) / reduction >= 1 else {
            throw GraftError.invalid("\(config.source): reduction_factor \(reduction) leaves no bottleneck for hidden size \(host.hiddenSize)")
        }
        let bottleneck = Int(Double(host.hiddenSize) / reduction)
        let attention = try config.bool("mh_adapter", default: defaults.attention)
        let feedForward = try config.bool("output_adapter", default: defaults.feedForward)
        guard attention || feedForward else {
            throw GraftError.invalid("\(config.source): mh_adapter and output_adapter are both false; the adapter would do nothing")
        }
        let activation: (Tensor) -> Tensor
        switch (try config.string("non_linearity") ?? defaults.activation).lowercased() {
        case "relu": activation = relu
        case "gelu": activation = gelu
        case "swish", "silu": activation = silu
        case "tanh": activation = tanh
        case "sigmoid": activation = sigmoid
        case let other: throw GraftError.invalid("\(config.source): non_linearity '\(other)' is not one of relu, gelu, swish, silu, tanh, sigmoid")
        }
        return BottleneckAdapterLayer(host: host, bottleneck: bottleneck, attention: attention, feedForward: feedForward, parallel: parallel,
                                      scaling: Float(try config.double("scaling", default: defaults.scaling)), activation: activation, state: state)
    }
}

/// Sequential bottleneck adapter after the feed-forward block (`peft_type: "SEQ_BN"`, Pfeiffer): `reduction_factor`
/// (16), `non_linearity` (relu), `scaling` (1), `mh_adapter` (false), `output_adapter` (true), `leave_out` (layers).
public enum BottleneckSequentialFactory: BottleneckFactory {
    public static let peftType = "SEQ_BN"
    public static let parallel = false
    public static let defaults = (reduction: 16, scaling: 1.0, attention: false, feedForward: true, activation: "relu")
}

/// Sequential bottleneck adapters after attention and after the feed-forward block (`"DOUBLE_SEQ_BN"`, Houlsby):
/// as `SEQ_BN` with `mh_adapter` true and swish.
public enum BottleneckDoubleSequentialFactory: BottleneckFactory {
    public static let peftType = "DOUBLE_SEQ_BN"
    public static let parallel = false
    public static let defaults = (reduction: 16, scaling: 1.0, attention: true, feedForward: true, activation: "swish")
}

/// Parallel bottleneck adapter beside the feed-forward block (`"PAR_BN"`, He et al.): `reduction_factor` (2),
/// `scaling` (4), relu; `mh_adapter` adds one beside attention.
public enum BottleneckParallelFactory: BottleneckFactory {
    public static let peftType = "PAR_BN"
    public static let parallel = true
    public static let defaults = (reduction: 2, scaling: 4.0, attention: false, feedForward: true, activation: "relu")
}
