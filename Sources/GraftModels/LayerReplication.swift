import GraftTensor

/// A model whose layer stack can be rebuilt from ranges of its own layers, the copies sharing the base weights
/// (PEFT's `layer_replication`, after mergekit's pass-through merges): `[[0, 4], [2, 6]]` over six layers stacks
/// `0 1 2 3 2 3 4 5`. Every entry is a new module over the same weight tensors, so adapters attach to each copy
/// separately, and the stack's names are renumbered (`encoder.layer.4` is a copy of layer 2).
public protocol LayerReplicating: AnyObject {
    /// The number of layers as loaded.
    var originalLayerCount: Int { get }
    /// The ranges the current stack was built from; nil for the stack as loaded.
    var layerReplication: [[Int]]? { get }
    /// Rebuilds the stack from `ranges` (each `[start, end)` within the loaded layers), or restores the loaded
    /// stack for nil. Throws naming the range at fault.
    func replicateLayers(_ ranges: [[Int]]?) throws
}

/// Checks PEFT `layer_replication` ranges against `count` layers; the flattened layer indices.
func replicationIndices(_ ranges: [[Int]], count: Int) throws -> [Int] {
    var indices: [Int] = []
    for (i, range) in ranges.enumerated() {
        guard range.count == 2, range[0] >= 0, range[0] < range[1], range[1] <= count else {
            throw GraftError.invalid("layer_replication[\(i)] = \(range) must be [start, end) with 0 ≤ start < end ≤ \(count) (the model's layers)")
        }
        indices += Array(range[0]..<range[1])
    }
    guard !indices.isEmpty, indices.count <= 1 << 12 else {
        throw GraftError.invalid("layer_replication \(ranges) stacks \(indices.count) layers; it must give 1...4096")
    }
    return indices
}

extension Linear {
    /// A new Linear over the same weight (dense tensor or compact blocks) and bias (and compute format), with no
    /// adapters.
    func sharingWeights() -> Linear {
        let copy = compactWeight.map { Linear(compact: $0, bias: bias) } ?? Linear(weight: weight, bias: bias)
        copy.computeDType = computeDType
        return copy
    }
}

extension BertModel: LayerReplicating {
    public var originalLayerCount: Int { originalLayers.count }

    public func replicateLayers(_ ranges: [[Int]]?) throws {
        guard let ranges else {
            install(originalLayers, ranges: nil)
            return
        }
        let indices = try replicationIndices(ranges, count: originalLayers.count)
        let stack = try indices.map { try originalLayers[$0].sharingWeights(config: config) }
        install(stack, ranges: ranges)
    }

    private func install(_ stack: [BertLayer], ranges: [[Int]]?) {
        layers = stack
        layerReplication = ranges
        (module(at: "encoder"))?.replaceChild("layer", with: ModuleList.numbered(stack))
    }
}

extension BertLayer {
    /// A new layer over this layer's tensors.
    func sharingWeights(config: BertConfig) throws -> BertLayer {
        let tensors = Dictionary(namedParameters(prefix: "x").map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
        return try BertLayer(prefix: "x", weights: { name in
            guard let t = tensors[name] else { throw GraftError(.internalError, "layer replication: no tensor '\(name)'") }
            return t
        }, config: config)
    }
}

extension LlamaModel: LayerReplicating {
    public var originalLayerCount: Int { originalLayers.count }

    public func replicateLayers(_ ranges: [[Int]]?) throws {
        guard let ranges else {
            install(originalLayers, ranges: nil)
            return
        }
        let indices = try replicationIndices(ranges, count: originalLayers.count)
        let stack = indices.enumerated().map { position, source in originalLayers[source].sharingWeights(layerIndex: position) }
        install(stack, ranges: ranges)
    }

    private func install(_ stack: [LlamaDecoderLayer], ranges: [[Int]]?) {
        layers = stack
        layerReplication = ranges
        (module(at: "model"))?.replaceChild("layers", with: ModuleList.numbered(stack))
    }
}

extension LlamaDecoderLayer {
    /// A new layer over this layer's tensors, at `layerIndex` of the stack.
    func sharingWeights(layerIndex: Int) -> LlamaDecoderLayer {
        let attention = LlamaAttention(q: qProj.sharingWeights(), k: kProj.sharingWeights(), v: vProj.sharingWeights(),
                                       o: oProj.sharingWeights(), config: config, layerIndex: layerIndex)
        return LlamaDecoderLayer(inputNorm: RMSNorm(weight: inputNorm.weight, eps: inputNorm.eps), attention: attention,
                                 postNorm: RMSNorm(weight: postAttentionNorm.weight, eps: postAttentionNorm.eps),
                                 gate: gateProj.sharingWeights(), up: upProj.sharingWeights(), down: downProj.sharingWeights(),
                                 config: config)
    }
}
