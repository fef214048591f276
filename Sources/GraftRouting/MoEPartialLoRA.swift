import Foundation
import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor

/// Which tokens of each forward pass belong to the new domain: those whose id is in ``domain`` (new-vocabulary
/// tokens, as the paper's image tokens). A ``GraftModels/TokenObserver`` on the decoder; stateless across passes,
/// so generation with a KV cache marks each new token by its own id.
public final class DomainTokenGate: TokenObserver {
    /// The new domain's token ids.
    public let domain: Set<Int32>
    let state: AdapterState
    /// The current pass's flags, one per token row; nil when no token of the pass is in the domain.
    private(set) var selected: [Bool]?
    /// Token rows of the current pass.
    private(set) var rows = 0

    init(domain: Set<Int32>, state: AdapterState) {
        self.domain = domain
        self.state = state
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }

    public func willRun(_ batch: TokenBatch, caches: [KVCache?]) {
        rows = batch.ids.count
        var flags = [Bool](repeating: false, count: rows)
        for r in 0..<batch.batchSize {
            for i in 0..<batch.lengths[r] where domain.contains(batch.ids[r * batch.length + i]) { flags[r * batch.length + i] = true }
        }
        selected = flags.contains(true) ? flags : nil
    }
}

/// New-domain experts in an MoE's redundant capacity (Dutt et al., 2025, "Exploiting Mixture-of-Experts
/// Redundancy Unlocks Multimodal Generative Abilities", seed #96): on an MoE base (upcycled copies of the FFN are
/// the redundancy the paper exploits), every expert gets a partial LoRA on its `gate`/`up`/`down` projections that
/// applies to the new domain's tokens only (``DomainTokenGate``); the other tokens run the frozen experts, so a
/// sequence without domain tokens computes the base model exactly (the paper's constraint C1). The router stays
/// frozen; which experts the domain's tokens reach is counted per expert (``domainTokens``, ``otherTokens``), the
/// paper's modality-specific pathways.
///
/// Expert `e` on a domain token runs `W_e + s · B_e A_e` for each projection (`s = α/r`). Parameters (Graft keys):
/// `mlp.experts.plora_{gate,up}_A` `[E, r, hidden]`, `…_B` `[E, m, r]`, `mlp.experts.plora_down_A` `[E, r, m]`,
/// `mlp.experts.plora_down_B` `[E, hidden, r]`; A Kaiming-uniform, B zero. Departure: the paper's
/// Gromov-Wasserstein initialisation aligns a new modality's *embeddings*; a text domain reuses the vocabulary's
/// trained embeddings, so there is nothing to initialise.
public final class MoEPartialLoRALayer: MoEBlockModuleAdapter {
    public let state: AdapterState
    /// The MoE block whose experts are adapted.
    public let block: MoEFeedForward
    /// `[E, r, hidden]`, `[E, m, r]`.
    public let gateA: Tensor, gateB: Tensor
    /// `[E, r, hidden]`, `[E, m, r]`.
    public let upA: Tensor, upB: Tensor
    /// `[E, r, m]`, `[E, hidden, r]`.
    public let downA: Tensor, downB: Tensor
    /// `α / r`.
    public let scaling: Float
    /// Which tokens are the domain's; shared by the adapter's layers.
    public let domainGate: DomainTokenGate
    /// Per expert, the domain tokens dispatched to it since the counts were last reset.
    public private(set) var domainTokens: [Int]
    /// Per expert, the other tokens dispatched to it.
    public private(set) var otherTokens: [Int]
    /// The domain tokens the block ran since the counts were last reset, and the passes that had any.
    public private(set) var domainTokenCount = 0, domainPasses = 0

    init(block: MoEFeedForward, rank: Int, alpha: Float, gate: DomainTokenGate, state: AdapterState) {
        self.state = state
        self.block = block
        self.domainGate = gate
        let e = block.experts, m = block.expertSize, h = block.hiddenSize
        func a(_ fanIn: Int) -> Tensor {
            let bound = 1 / Float(fanIn).squareRoot()
            return Tensor.randomUniform([e, rank, fanIn], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        }
        gateA = a(h); gateB = Tensor(zeros: [e, m, rank]).requiringGrad()
        upA = a(h); upB = Tensor(zeros: [e, m, rank]).requiringGrad()
        downA = a(m); downB = Tensor(zeros: [e, h, rank]).requiringGrad()
        scaling = alpha / Float(rank)
        domainTokens = [Int](repeating: 0, count: e)
        otherTokens = [Int](repeating: 0, count: e)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("mlp.experts.plora_gate_A", gateA), ("mlp.experts.plora_gate_B", gateB), ("mlp.experts.plora_up_A", upA),
         ("mlp.experts.plora_up_B", upB), ("mlp.experts.plora_down_A", downA), ("mlp.experts.plora_down_B", downB)]
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var replacedExperts: ReplacedExperts? { nil }
    public func addedOutput(_ x: Tensor) -> Tensor? { nil }
    public var mergeable: Bool { false }
    public var notMergeableReason: String { "its update applies to the new domain's tokens only" }

    /// The adapted experts for the pass's domain tokens; nil when the pass has none (or its rows are not the
    /// observed tokens), so the block runs exactly as the base.
    public func tokenExperts(rows: Int) -> TokenExperts? {
        guard domainGate.rows == rows, let selected = domainGate.selected else { return nil }
        domainTokenCount += selected.reduce(0) { $0 + ($1 ? 1 : 0) }
        domainPasses += 1
        return TokenExperts(selected: selected, gate: block.gateWeight + matmul(gateB, gateA) * scaling,
                            up: block.upWeight + matmul(upB, upA) * scaling,
                            down: block.downWeight + matmul(downB, downA) * scaling) { [weak self] e, d, o in
            self?.domainTokens[e] += d
            self?.otherTokens[e] += o
        }
    }

    /// Zeroes ``domainTokens``, ``otherTokens`` and the domain token and pass counts.
    public func resetCounts() {
        domainTokens = [Int](repeating: 0, count: block.experts)
        otherTokens = domainTokens
        domainTokenCount = 0
        domainPasses = 0
    }
}

extension MoEPartialLoRALayer: RouterStatisticsReporting {
    /// One entry, the new domain's pathway through the frozen router (the paper's modality-specific experts), at
    /// `<block>.experts.plora_domain`: per expert the domain tokens dispatched to it (`dispatchedTokens`; `load`
    /// is their share), `tokens` the domain tokens run. The router is the base's, so its entropy and the load of
    /// all tokens are the block's own statistics (``MoEFeedForward/statistics``); here the entropy is 0.
    public var routerStatistics: [RouterLayerStatistics] {
        var stats = RouterLayerStatistics(path: block.path + ".experts.plora_domain", experts: block.experts)
        stats.forwardPasses = domainPasses
        stats.tokens = domainTokenCount
        stats.dispatchedTokens = domainTokens
        stats.gateMass = domainTokens.map(Double.init)
        return [stats]
    }

    /// Clears the counts (``resetCounts()``).
    public func resetRouterStatistics() { resetCounts() }
}

extension MoEFeedForward {
    /// The routed experts with `split`'s weights on its selected tokens and the block's own on the rest; both
    /// sums use the same routing (`rows` nil: every token).
    func routedWithTokenExperts(_ x: Tensor, _ split: TokenExperts, weights: Tensor?, rows: [[Int32]?],
                                sizes: [Int]?) -> Tensor {
        let all = (0..<Int32(x.rows)).map { $0 }
        var baseRows: [[Int32]?] = [], domainRows: [[Int32]?] = []
        for (e, r) in rows.enumerated() {
            let routed = r ?? all
            let d = routed.filter { split.selected[Int($0)] }, o = routed.filter { !split.selected[Int($0)] }
            domainRows.append(d)
            baseRows.append(o)
            split.record(e, d.count, o.count)
        }
        let base = routedSwiGLUExperts(x, gate: gateWeight, up: upWeight, down: downWeight, weights: weights, rows: baseRows,
                                       sizes: sizes)
        let adapted = routedSwiGLUExperts(x, gate: split.gate, up: split.up, down: split.down, weights: weights,
                                          rows: domainRows, sizes: sizes)
        return base + adapted
    }
}

/// New-domain partial LoRA on the experts of an MoE base (`peft_type: "MOE_PLORA"`, Graft's own type, seed #96).
/// Keys: `domain_token_ids` (token ids of the new domain) and/or `domain_token_ranges` (`[[first, last], …]`,
/// inclusive), at least one id in all; `r` (8), `lora_alpha` (16). Adapts every decoder layer that has an MoE
/// block; a model without one is refused.
public enum MoEPartialLoRAFactory: ModuleAdapterFactory {
    public static let peftType = "MOE_PLORA"
    public static let family = "partial LoRA on MoE experts for a new domain's tokens only (MoE redundancy)"
    public static var selectsLayers: Bool { true }
    public static var requiresDecoder: Bool { true }
    public static var mergeable: Bool { false }
    /// Where the adapter's ``DomainTokenGate`` lives in ``GraftAdapters/AdapterState/methodObjects``.
    static let gateKey = "moe_plora.gate"

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 4, "lora_alpha": 8, "domain_token_ranges": [[0, 255]]]
    }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let r = try config.int("r", default: 8)
        guard r >= 1 else { throw GraftError.invalid("\(config.source): 'r' must be ≥ 1, got \(r)") }
        let alpha = try config.double("lora_alpha", default: 16)
        guard alpha.isFinite else { throw GraftError.invalid("\(config.source): 'lora_alpha' must be finite, got \(alpha)") }
        let known = state.methodObjects[gateKey] as? DomainTokenGate
        let gate = try known ?? DomainTokenGate(domain: domainTokens(config), state: state)
        state.methodObjects[gateKey] = gate
        guard let layer = module as? LlamaDecoderLayer else { return nil }
        // Layers without an MoE block (a base upcycled in some layers only) are left as they are.
        guard let block = layer.feedForwardOverride as? MoEFeedForward else { return nil }
        return MoEPartialLoRALayer(block: block, rank: r, alpha: Float(alpha), gate: gate, state: state)
    }

    /// The domain's token ids from `domain_token_ids` and `domain_token_ranges`; throws naming a bad entry.
    static func domainTokens(_ config: AdapterConfig) throws -> Set<Int32> {
        var ids = Set<Int32>()
        func tokenID(_ v: Any, _ what: String) throws -> Int32 {
            guard let n = JSONScalar.integer(v), n >= 0, n <= Int(Int32.max) else {
                throw GraftError.invalid("\(config.source): \(what) = \(JSONScalar.describe(v)) is not a token id")
            }
            return Int32(n)
        }
        if let value = config.value("domain_token_ids"), !(value is NSNull) {
            guard let list = value as? [Any] else {
                throw GraftError.invalid("\(config.source): 'domain_token_ids' must be a list of token ids, got \(JSONScalar.describe(value))")
            }
            for (i, v) in list.enumerated() { ids.insert(try tokenID(v, "'domain_token_ids'[\(i)]")) }
        }
        if let value = config.value("domain_token_ranges"), !(value is NSNull) {
            guard let list = value as? [Any] else {
                throw GraftError.invalid("\(config.source): 'domain_token_ranges' must be a list of [first, last] pairs, got \(JSONScalar.describe(value))")
            }
            for (i, v) in list.enumerated() {
                guard let pair = v as? [Any], pair.count == 2 else {
                    throw GraftError.invalid("\(config.source): 'domain_token_ranges'[\(i)] = \(JSONScalar.describe(v)) is not a [first, last] pair")
                }
                let lo = try tokenID(pair[0], "'domain_token_ranges'[\(i)][0]"), hi = try tokenID(pair[1], "'domain_token_ranges'[\(i)][1]")
                guard lo <= hi, Int(hi) - Int(lo) < 1 << 20 else {
                    throw GraftError.invalid("\(config.source): 'domain_token_ranges'[\(i)] = [\(lo), \(hi)] must have first ≤ last and span under 2^20 ids")
                }
                for t in lo...hi { ids.insert(t) }
            }
        }
        guard !ids.isEmpty else {
            throw GraftError.invalid("\(config.source): MOE_PLORA needs the new domain's tokens: 'domain_token_ids' or 'domain_token_ranges'")
        }
        return ids
    }

    /// Installs the domain gate on the decoder, after checking its ids against the vocabulary.
    public static func didAttach(_ adapter: NamedAdapter, root: Module) throws {
        guard let gate = adapter.state.methodObjects[gateKey] as? DomainTokenGate else { return }
        guard let host = root as? LlamaModel ?? root.namedModules().lazy.compactMap({ $0.module as? LlamaModel }).first else {
            throw GraftError(.unsupported, "\(adapter.config.source): MOE_PLORA needs a Llama decoder, not \(root.typeName)")
        }
        if let bad = gate.domain.first(where: { Int($0) >= host.config.vocabSize }) {
            throw GraftError.invalid("\(adapter.config.source): domain token id \(bad) is outside the vocabulary (0..<\(host.config.vocabSize))")
        }
        host.tokenObservers.append(gate)
    }

    public static func willDetach(_ adapter: NamedAdapter, root: Module) {
        guard let gate = adapter.state.methodObjects[gateKey] as? DomainTokenGate,
              let host = root as? LlamaModel ?? root.namedModules().lazy.compactMap({ $0.module as? LlamaModel }).first else { return }
        host.tokenObservers.removeAll { $0 === gate }
    }
}
