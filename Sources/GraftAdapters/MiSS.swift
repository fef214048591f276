import GraftIO
import GraftModels
import GraftTensor

/// MiSS (Kang et al., "Bone"/MiSS): a shared block `D` `[r, out]`; the input is folded into `r` features by
/// summing its `in/r` consecutive chunks (zero-padded), `y = W x + b + fold(x) D`. PEFT key `miss_block`.
/// The `mini` variant repeats a `[r, mini_r]` block across the output.
public final class MiSSLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The block, `[r, out]` (or `[r, mini_r]`).
    public let block: Tensor
    /// The constant folding matrix `[r, in]` with ones where `i % r == j`.
    let fold: Tensor
    let outFeatures: Int
    let dropoutProbability: Float

    /// Creates the layer as PEFT does (zeros: the identity).
    public init(base: Linear, rank: Int, miniRank: Int?, dropout: Float, state: AdapterState) {
        self.state = state
        outFeatures = base.outFeatures
        dropoutProbability = dropout
        block = Tensor(zeros: [rank, miniRank ?? base.outFeatures]).requiringGrad()
        let f = Tensor(zeros: [rank, base.inFeatures])
        for i in 0..<base.inFeatures { f.pointer[(i % rank) * base.inFeatures + i] = 1 }
        fold = f
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("miss_block", block)] }

    /// The block over the full output width.
    private func fullBlock() -> Tensor {
        let width = block.shape[1]
        guard width != outFeatures else { return block }
        return concat([Tensor](repeating: block, count: outFeatures / width), dim: 1)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let folded = linear(dropout(x, p: dropoutProbability, state: state), fold)  // [..., r]
        let shape = folded.shape
        let update = matmul(folded.reshaped([-1, shape[shape.count - 1]]), fullBlock())
        return y + update.reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(fullBlock(), fold, transposeA: true) }
    }
}

/// MiSS (`peft_type: "MISS"`): `r`, `mini_r`, `init_weights` (`true` or `"mini"`; `"bat"` is not supported yet),
/// `miss_dropout`.
public enum MiSSFactory: AdapterMethodFactory {
    public static let peftType = "MISS"
    public static let family = "weight-delta (shared block)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 64, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        switch config.value("init_weights") {
        case nil: break
        case let b? where JSONScalar.isBool(b): break
        case let s as String where s == "mini": break
        case let other?: throw GraftError(.unsupported, "\(config.source): MiSS init_weights \(other) is not supported (true or \"mini\")")
        }
        let r = try config.int("r", default: 64)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let defaultRank = try config.int("r", default: 64)
        let r = try config.patternSize("rank_pattern", path: path, default: defaultRank)
        let miniRank = try config.int("mini_r", default: 1)
        let mini = (config.value("init_weights") as? String) == "mini" ? miniRank : nil
        if let mini, mini <= 0 || layer.outFeatures % mini != 0 {
            throw GraftError.invalid("\(config.source): mini_r \(mini) must divide out_features \(layer.outFeatures) of '\(path)'")
        }
        return MiSSLayer(base: layer, rank: r, miniRank: mini, dropout: Float(try config.double("miss_dropout", default: 0)), state: state)
    }
}
