import GraftTensor

/// What a ``LayerDepthPolicy`` needs to run a decoder's layers over one pass: the tokens' positions, the
/// attention mask, the KV cache (generation) and each row's count of real tokens.
public struct LayerPass {
    /// Rotary positions, `[batch · length]`.
    public let positions: [Int32]
    /// The pass's attention mask (causal; padding or the cache offset as the plain loop uses them).
    public let mask: AttentionMask
    /// The sequence's KV cache when generating (one row), nil otherwise.
    public let cache: KVCache?
    /// Per batch row, how many leading tokens are real (the rest is padding).
    public let lengths: [Int]

    /// A pass description; see the properties.
    public init(positions: [Int32], mask: AttentionMask, cache: KVCache?, lengths: [Int]) {
        self.positions = positions
        self.mask = mask
        self.cache = cache
        self.lengths = lengths
    }
}

/// Runs a decoder's layer stack in place of the plain loop (every layer once, in order), choosing per sequence or
/// per token to skip a layer, run it once or run it again (dynamic depth: Dr.LLM's per-layer routers).
///
/// The KV policy every policy follows: run `e` of layer `i` (0 = first) over a cached sequence appends its keys
/// and values to ``KVCache/layer(_:execution:)`` `(i, e)` and attends to that cache only, so a skipped layer writes
/// nothing and a repeated layer's second run sees the second runs of earlier positions. A policy fixes the route of
/// a cached sequence on its first pass (``KVCache/layerRoutes``) and keeps it for every later pass, so generation
/// with the cache gives the tokens a run over the whole sequence without the cache gives under that route.
public protocol LayerDepthPolicy: AnyObject {
    /// Whether the policy runs the layers of the next pass (the plain loop runs otherwise).
    var isEnabled: Bool { get }
    /// The hidden states after `layers`, for the embeddings `x` `[batch, length, hidden]`. Throws when the pass
    /// does not fit the policy (a route of another depth, a cache continued without a route).
    func runLayers(_ x: Tensor, layers: [LlamaDecoderLayer], pass: LayerPass) throws -> Tensor
}

extension LlamaDecoderLayer {
    /// One run of the layer over `x` `[batch, length, hidden]` at `positions`, appending its keys and values to
    /// `cache` when given (a ``LayerDepthPolicy`` passes ``KVCache/layer(_:execution:)``). Recorded for autograd.
    public func run(_ x: Tensor, positions: [Int32], mask: AttentionMask, cache: KVCache.Layer?) -> Tensor {
        forward(x, positions: positions, mask: mask, cache: cache)
    }
}

extension LlamaModel {
    /// The layers under the enabled depth policy, for one pass over `batch` (nil without one: the caller runs the
    /// plain loop). Packed rows are refused: a policy routes whole sequences.
    func runDepthPolicy(_ x: Tensor, batch: TokenBatch, positions: [Int32], mask: AttentionMask,
                        cache: KVCache?) throws -> Tensor? {
        guard let policy = depthPolicy, policy.isEnabled else { return nil }
        guard batch.segments == nil else {
            throw GraftError(.unsupported, "a dynamic-depth policy routes whole sequences; it does not take packed rows (pad them)")
        }
        return try policy.runLayers(x, layers: layers, pass: LayerPass(positions: positions, mask: mask, cache: cache,
                                                                       lengths: batch.lengths))
    }

    /// Batched generation under the depth policy: each row runs alone against its own cache (rows may take
    /// different routes), its real tokens only; padding positions of the result are zero.
    func runDepthPolicy(_ x: Tensor, batch: TokenBatch, positions: [Int32], rowCaches caches: [KVCache]) throws -> Tensor? {
        guard let policy = depthPolicy, policy.isEnabled else { return nil }
        let t = batch.length, h = config.hiddenSize
        let out = Tensor(zeros: [batch.batchSize, t, h])
        for r in 0..<batch.batchSize {
            let n = batch.lengths[r]
            guard n > 0 else { continue }
            let row = x.slice(dim: 0, r..<(r + 1)).slice(dim: 1, 0..<n)
            let rowPositions = Array(positions[(r * t)..<(r * t + n)])
            let mask = AttentionMask(causal: true, queryOffset: caches[r].length)
            let y = try policy.runLayers(row, layers: layers, pass: LayerPass(positions: rowPositions, mask: mask,
                                                                                cache: caches[r], lengths: [n]))
            (out.pointer + r * t * h).update(from: y.pointer, count: n * h)
        }
        return out
    }
}
