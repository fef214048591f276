import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor

/// How ESFT scores an expert's relevance to a task (Wang et al., 2024, "Let the Expert Stick to His Last").
public enum ESFTScore: String, Sendable, CaseIterable {
    /// Average gate score: over the task's tokens, the router's probability for the expert where the token is
    /// routed to it (0 elsewhere).
    case gate
    /// Token selection ratio: the fraction of the task's (token, expert) selections that chose the expert
    /// (each token's `k` selections count `1/k` each).
    case token
}

/// Expert-Specialized Fine-Tuning (ESFT, seed #66) of an MoE base: measure each layer's routing share per expert
/// on the task's data, select per layer the most relevant experts until their cumulative share reaches `top_p`,
/// and train only those experts' weights (router, other experts and every other module frozen).
///
/// The selection is made before the adapter exists and stored in its config (`experts`: layer → expert
/// indices), so a saved adapter is rebuilt with the same shapes; ``configuration(model:sequences:score:topP:)``
/// measures and selects in one call.
public enum ESFT {
    /// Each MoE layer's relevance score per expert on `sequences` (run one at a time without gradients, the first
    /// `maxTokens` tokens at most), in layer order. `gate` scores sum to the mean routed probability mass,
    /// `token` scores to 1. The blocks' router statistics are reset before and after.
    public static func scores(model: LlamaModel, sequences: [[Int32]], score: ESFTScore, maxTokens: Int = 8192) throws -> [[Double]] {
        let blocks = model.moeBlocks
        guard !blocks.isEmpty else {
            throw GraftError(.state, "ESFT needs an MoE base (graft moefy); the model has no MoE feed-forward blocks")
        }
        guard maxTokens >= 1 else { throw GraftError.invalid("ESFT: the scoring budget must be ≥ 1 token, got \(maxTokens)") }
        model.resetMoERouterStatistics()
        defer { model.resetMoERouterStatistics() }
        var seen = 0
        try withNoGrad {
            for seq in sequences where !seq.isEmpty && seen < maxTokens {
                let ids = Array(seq.prefix(maxTokens - seen))
                _ = try model.hiddenStates(TokenBatch(sequences: [ids]))
                seen += ids.count
            }
        }
        guard seen > 0 else { throw GraftError.invalid("ESFT: the task data holds no tokens to score the experts on") }
        return blocks.map { scores(from: $0.statistics, score: score) }
    }

    /// The per-expert scores in `stats`: the gate score is the routed probability mass over the tokens, the
    /// token score the expert's share of the dispatched selections.
    public static func scores(from stats: RouterLayerStatistics, score: ESFTScore) -> [Double] {
        switch score {
        case .gate:
            return stats.probabilityMass.map { stats.tokens > 0 ? $0 / Double(stats.tokens) : 0 }
        case .token:
            let total = Double(stats.dispatchedTokens.reduce(0, +))
            return stats.dispatchedTokens.map { total > 0 ? Double($0) / total : 0 }
        }
    }

    /// The experts to tune in one layer: experts in decreasing order of score (ties to the lower index) are
    /// added while the cumulative score is below `topP`, so the selection is the shortest prefix reaching it
    /// (every expert when the scores never reach it). Ascending.
    public static func select(scores: [Double], topP: Double) -> [Int] {
        let order = scores.indices.sorted { scores[$0] > scores[$1] || (scores[$0] == scores[$1] && $0 < $1) }
        var total = 0.0
        var out: [Int] = []
        for e in order {
            if total >= topP { break }
            out.append(e)
            total += scores[e]
        }
        return out.sorted()
    }

    /// An ESFT adapter config for `model` (an MoE base) and the task's `sequences`: the scores of
    /// ``scores(model:sequences:score:maxTokens:)`` and the selection of ``select(scores:topP:)`` per layer, as
    /// `{"peft_type": "ESFT", "score_function": …, "top_p": …, "experts": {"<layer>": [experts]}}`.
    public static func configuration(model: LlamaModel, sequences: [[Int32]], score: ESFTScore = .token, topP: Double = 0.2,
                                     maxTokens: Int = 8192) throws -> [String: Any] {
        guard topP > 0, topP <= 1 else { throw GraftError.invalid("ESFT: top_p must be in (0, 1], got \(topP)") }
        let perLayer = try scores(model: model, sequences: sequences, score: score, maxTokens: maxTokens)
        var experts: [String: [Int]] = [:]
        // Keyed by decoder layer, not block: an MoE base may convert some layers only.
        for (layer, s) in zip(model.moeLayerIndices, perLayer) { experts[String(layer)] = select(scores: s, topP: topP) }
        return ["peft_type": ESFTFactory.peftType, "score_function": score.rawValue, "top_p": topP, "experts": experts,
                "num_experts": model.moeBlocks.first?.experts ?? 0]
    }
}

/// The tuned experts of one MoE layer (ESFT): trainable copies of the selected experts' weights, which the
/// block runs instead of its own for those experts. Parameters (Graft keys, no PEFT equivalent):
/// `mlp.tuned_experts.gate_proj` / `up_proj` `[S, m, hidden]`, `mlp.tuned_experts.down_proj` `[S, hidden, m]`,
/// the selected experts in ascending order; they start equal to the base experts, so a new adapter changes nothing.
public final class ESFTLayer: ModuleAdapterMethod, MoEBlockAdapter {
    public let state: AdapterState
    /// The MoE block whose experts are tuned.
    public let block: MoEFeedForward
    /// The tuned experts.
    public let tuned: ReplacedExperts

    /// Copies experts `indices` (ascending, distinct, in range) of `block` as trainable tensors.
    public init(block: MoEFeedForward, indices: [Int], state: AdapterState) {
        self.state = state
        self.block = block
        let m = block.expertSize, h = block.hiddenSize, s = indices.count
        let gate = Tensor(zeros: [s, m, h]), up = Tensor(zeros: [s, m, h]), down = Tensor(zeros: [s, h, m])
        for (i, e) in indices.enumerated() {
            (gate.pointer + i * m * h).update(from: block.gateWeight.pointer + e * m * h, count: m * h)
            (up.pointer + i * m * h).update(from: block.upWeight.pointer + e * m * h, count: m * h)
            (down.pointer + i * h * m).update(from: block.downWeight.pointer + e * h * m, count: h * m)
        }
        tuned = ReplacedExperts(indices: indices, gate: gate.requiringGrad(), up: up.requiringGrad(), down: down.requiringGrad())
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("mlp.tuned_experts.gate_proj", tuned.gate), ("mlp.tuned_experts.up_proj", tuned.up), ("mlp.tuned_experts.down_proj", tuned.down)]
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var replacedExperts: ReplacedExperts? { tuned }
    public func addedOutput(_ x: Tensor) -> Tensor? { nil }

    public func attach() { block.adapters.append(self) }
    public func detach() { block.adapters.removeAll { $0 === self } }

    /// The block's weight tensors with the tuned ones, pairwise: (block tensor, tuned tensor, floats per expert).
    private var pairs: [(Tensor, Tensor, Int)] {
        let n = block.expertSize * block.hiddenSize
        return [(block.gateWeight, tuned.gate, n), (block.upWeight, tuned.up, n), (block.downWeight, tuned.down, n)]
    }

    /// Writes the tuned experts into the block's weights; returns the replaced base values.
    public func merge() -> [Tensor] {
        pairs.map { base, t, n in
            let saved = Tensor(zeros: t.shape)
            for (i, e) in tuned.indices.enumerated() {
                (saved.pointer + i * n).update(from: base.pointer + e * n, count: n)
                (base.pointer + e * n).update(from: t.pointer + i * n, count: n)
            }
            return saved
        }
    }

    /// Restores the base experts saved by ``merge()``.
    public func unmerge(_ saved: [Tensor]) {
        for ((base, _, n), values) in zip(pairs, saved) {
            for (i, e) in tuned.indices.enumerated() { (base.pointer + e * n).update(from: values.pointer + i * n, count: n) }
        }
    }

    public func load(_ name: String, from tensor: Tensor) throws {
        try loadNamedParameter(name, from: tensor, hint: "experts")
        for j in 0..<tensor.count where !tensor.pointer[j].isFinite {
            throw GraftError.format("'\(name)' entry \(j) is not finite")
        }
    }
}

/// ESFT (`peft_type: "ESFT"`, Graft's own type): on an MoE base, only the experts listed in `experts`
/// (`{"<layer>": [expert, …]}`, made by ``ESFT/configuration(model:sequences:score:topP:maxTokens:)`` or by
/// `graft train` from the training data) train. `score_function` (`"token"` or `"gate"`) and `top_p` (0.2)
/// record how they were chosen; `num_experts`, when present, must equal the base's.
public enum ESFTFactory: ModuleAdapterFactory {
    public static let peftType = "ESFT"
    public static let family = "expert-specialized fine-tuning of an MoE base"
    public static var selectsLayers: Bool { true }
    public static var requiresDecoder: Bool { true }
    public static var mergeable: Bool { true }

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["score_function": ESFTScore.token.rawValue, "top_p": 0.2, "experts": ["0": [0]]]
    }

    /// The selection in `config`: layer index → ascending expert indices; throws naming the entry at fault.
    public static func selection(_ config: AdapterConfig) throws -> [Int: [Int]] {
        if let name = try config.string("score_function"), ESFTScore(rawValue: name) == nil {
            throw GraftError.invalid("\(config.source): 'score_function' must be \"token\" or \"gate\", got \"\(name)\"")
        }
        let p = try config.double("top_p", default: 0.2)
        guard p > 0, p <= 1 else { throw GraftError.invalid("\(config.source): 'top_p' must be in (0, 1], got \(p)") }
        guard let raw = config.value("experts") as? [String: Any] else {
            throw GraftError.invalid("\(config.source): 'experts' must map layer numbers to the expert indices to tune, e.g. {\"0\": [1, 3]}; ESFT.configuration (or graft train on an MoE base) makes it from the task's data")
        }
        var out: [Int: [Int]] = [:]
        for (key, value) in raw {
            guard let layer = Int(key), layer >= 0 else {
                throw GraftError.invalid("\(config.source): 'experts' key '\(key)' is not a layer number")
            }
            let list = value as? [Any] ?? []
            let ids = list.compactMap { JSONScalar.integer($0) }
            guard value is [Any], ids.count == list.count, Set(ids).count == ids.count, ids.allSatisfy({ $0 >= 0 }) else {
                throw GraftError.invalid("\(config.source): 'experts' entry '\(key)' must be a list of distinct expert indices, got \(value)")
            }
            out[layer] = ids.sorted()
        }
        return out
    }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let selected = try selection(config)
        // The decoder's layer list (visited before its layers): every layer number must exist.
        if !module.children.isEmpty, module.children.allSatisfy({ $0.module is LlamaDecoderLayer }) {
            if let bad = selected.keys.sorted().first(where: { $0 >= module.children.count }) {
                throw GraftError.invalid("\(config.source): 'experts' names layer \(bad), but the model has \(module.children.count) layers")
            }
            return nil
        }
        guard let layer = module as? LlamaDecoderLayer, let index = path.split(separator: ".").last.flatMap({ Int($0) }) else { return nil }
        // A layer the selection does not name is left alone (an MoE base may convert some layers only).
        guard selected[index] != nil else { return nil }
        guard let block = layer.feedForwardOverride as? MoEFeedForward else {
            throw GraftError(.state, "\(config.source): ESFT tunes the experts of an MoE base, but '\(path)' has no MoE block (make one with graft moefy and load it first: MoEBaseFormat.load, or moe_base in a graft train config)")
        }
        let expected = try config.int("num_experts", default: block.experts)
        guard expected == block.experts else {
            throw GraftError.invalid("\(config.source): 'num_experts' is \(expected), the MoE base has \(block.experts) experts per layer")
        }
        guard let ids = selected[index], !ids.isEmpty else { return nil }
        if let bad = ids.first(where: { $0 >= block.experts }) {
            throw GraftError.invalid("\(config.source): 'experts' entry '\(index)' names expert \(bad), but '\(path)' has \(block.experts) experts")
        }
        return ESFTLayer(block: block, indices: ids, state: state)
    }
}
