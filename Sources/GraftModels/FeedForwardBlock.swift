import GraftTensor

/// A replacement for a decoder layer's dense SwiGLU feed-forward block, such as a mixture of experts made from
/// it (``LlamaDecoderLayer/feedForwardOverride``).
///
/// While a replacement is set the layer does not run its `mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj`
/// Linear modules, so adapters attached to them do not apply; layer adapters at the feed-forward site still do.
public protocol FeedForwardBlock: AnyObject {
    /// The block's output for the normed hidden state `x` (`[batch, length, hidden]` or `[tokens, hidden]`), of
    /// the same shape.
    func forward(_ x: Tensor) -> Tensor
}

extension LlamaDecoderLayer {
    /// The dense MLP's projections, which an ``feedForwardOverride`` replaces (adapters on them would not apply).
    public var denseFeedForwardProjections: [Linear] { [gateProj, upProj, downProj] }
}

