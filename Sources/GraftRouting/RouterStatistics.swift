import Foundation
import GraftAdapters
import GraftTensor

/// What one mixture layer's router did since its statistics were last reset: enough to see collapse (one
/// expert taking every token), capacity pressure and how peaked the router is.
public struct RouterLayerStatistics: Sendable, Codable, Equatable {
    /// The layer's module path.
    public var path: String
    /// Experts in the layer.
    public var experts: Int
    /// Forward passes counted.
    public var forwardPasses: Int = 0
    /// Tokens routed.
    public var tokens: Int = 0
    /// Per expert, tokens sent to it (after capacity).
    public var dispatchedTokens: [Int]
    /// Per expert, the sum over tokens of the gate weight applied to it.
    public var gateMass: [Double]
    /// Per expert, selections dropped because the expert was at capacity.
    public var overflow: [Int]
    /// Per expert, the sum over the tokens sent to it of the router's softmax probability for it (ESFT's average
    /// gate score is this over the tokens, whatever weight the layer applies).
    public var probabilityMass: [Double]
    /// Sum over tokens of the router's entropy (nats).
    public var entropySum: Double = 0
    /// Tokens whose selection was compared with the experts that actually matter most (MoE bases, when checked).
    public var agreementTokens: Int = 0
    /// Over those tokens, selected experts that are among the token's true top-k experts.
    public var agreementHits: Int = 0
    /// The `k` of those comparisons (experts selected per token).
    public var agreementK: Int = 0
    /// A depth router's choices as layer runs: choice `j` runs the layer (or shared block) `executionsPerChoice[j]`
    /// times (Dr.LLM: `[0, 1, 2]` for skip, execute, repeat), so ``dispatchedTokens`` is the depth histogram;
    /// nil for an expert router.
    public var executionsPerChoice: [Int]?

    /// Empty statistics for a layer of `experts` experts.
    public init(path: String, experts: Int) {
        self.path = path
        self.experts = experts
        dispatchedTokens = [Int](repeating: 0, count: experts)
        gateMass = [Double](repeating: 0, count: experts)
        overflow = [Int](repeating: 0, count: experts)
        probabilityMass = [Double](repeating: 0, count: experts)
    }

    /// Expert load: the fraction of the applied gate weight each expert received (sums to 1 without overflow).
    public var load: [Double] {
        let total = gateMass.reduce(0, +)
        return gateMass.map { total > 0 ? $0 / total : 0 }
    }

    /// Per expert, the fraction of tokens sent to it (sums to the mean number of experts per token).
    public var tokenFraction: [Double] { dispatchedTokens.map { tokens > 0 ? Double($0) / Double(tokens) : 0 } }

    /// Mean router entropy per token in nats (`log E` is a uniform router, 0 a one-hot one).
    public var meanEntropy: Double { tokens > 0 ? entropySum / Double(tokens) : 0 }

    /// Top-k agreement: the mean fraction of a token's true top-k experts the router selected (`k / E` for a
    /// random router; 0 when nothing was compared).
    public var topKAgreement: Double {
        agreementTokens > 0 && agreementK > 0 ? Double(agreementHits) / Double(agreementTokens * agreementK) : 0
    }

    /// Selections dropped at capacity, all experts together.
    public var overflowCount: Int { overflow.reduce(0, +) }

    /// Empty statistics for a depth router whose choice `j` runs its layer `executionsPerChoice[j]` times.
    public init(path: String, executionsPerChoice: [Int]) {
        self.init(path: path, experts: executionsPerChoice.count)
        self.executionsPerChoice = executionsPerChoice
    }

    /// A depth router's mean layer runs per routed token (0 for an expert router or before any token).
    public var meanDepth: Double {
        guard let runs = executionsPerChoice, tokens > 0 else { return 0 }
        return Double(zip(dispatchedTokens, runs).reduce(0) { $0 + $1.0 * $1.1 }) / Double(tokens)
    }

    /// Adds one pass of a depth router that routes whole sequences: per sequence, its router probabilities
    /// (`choices` entries each), the choice taken and its token count. Entropy and gate mass count per token.
    mutating func recordRoutes(probabilities: [Float], chosen: [Int], tokens rowTokens: [Int]) {
        forwardPasses += 1
        let c = experts
        for (r, choice) in chosen.enumerated() where r < rowTokens.count && choice >= 0 && choice < c {
            let n = rowTokens[r]
            tokens += n
            dispatchedTokens[choice] += n
            var h: Double = 0
            for j in 0..<c where r * c + j < probabilities.count {
                let p = Double(probabilities[r * c + j])
                if p > 0 { h -= p * Foundation.log(p) }
                gateMass[j] += p * Double(n)
            }
            entropySum += h * Double(n)
        }
    }

    /// Adds one forward pass: the router's probabilities and the gates applied, both `[T, E]`.
    mutating func record(probs: Tensor, gates: Tensor, plan: RoutePlan) {
        let t = plan.tokens, e = plan.experts
        forwardPasses += 1
        tokens += t
        let pp = probs.pointer, pg = gates.pointer
        var h: Double = 0
        var mass = [Double](repeating: 0, count: e), routedProbability = [Double](repeating: 0, count: e)
        for i in 0..<t {
            for j in 0..<e {
                let p = pp[i * e + j]
                if p > 0 { h -= Double(p) * Double(Foundation.log(p)) }
                mass[j] += Double(pg[i * e + j])
                routedProbability[j] += Double(p * plan.dispatched[i * e + j])
            }
        }
        entropySum += h
        for j in 0..<e {
            gateMass[j] += mass[j]
            probabilityMass[j] += routedProbability[j]
            dispatchedTokens[j] += plan.rows[j]?.count ?? t
            overflow[j] += plan.overflow[j]
        }
    }

    /// A JSON object with the derived figures (load, token fraction, mean entropy, overflow).
    public var summary: [String: Any] {
        ["path": path, "experts": experts, "forward_passes": forwardPasses, "tokens": tokens, "load": load,
         "token_fraction": tokenFraction, "mean_entropy": meanEntropy, "overflow": overflow, "overflow_count": overflowCount,
         "top_k_agreement": topKAgreement, "agreement_tokens": agreementTokens,
         "mean_routed_probability": probabilityMass.map { tokens > 0 ? $0 / Double(tokens) : 0 }]
            .merging(executionsPerChoice.map { ["executions_per_choice": $0, "depth_histogram": dispatchedTokens,
                                               "mean_depth": meanDepth] } ?? [:]) { _, new in new }
    }
}

/// A Linear adapter with one or more routers that report statistics (MTLoRA's task modules, S'MoRE's levels).
public protocol RouterStatisticsReporting: AnyObject {
    /// The statistics of the layer's routers since the last reset, one entry per router.
    var routerStatistics: [RouterLayerStatistics] { get }
    /// Clears them.
    func resetRouterStatistics()
}

extension AdaptedModel {
    /// Router statistics of every mixture layer of adapter `name` (all adapters when nil), in layer order: the
    /// Linear mixtures (`LORA_MOE`, `MOV`, and every router of `MTLORA`, `SMORE` layers), the PEFT experts'
    /// routers in MoE blocks (`PERFT`) and the new domain's pathways through them (`MOE_PLORA`).
    public func routerStatistics(adapter name: String? = nil) -> [(adapter: String, stats: RouterLayerStatistics)] {
        adapters.filter { name == nil || $0.name == name }.flatMap { a in
            a.layers.flatMap { l -> [(String, RouterLayerStatistics)] in
                if let m = l.adapter as? LoRAMixtureLayer { return [(a.name, m.statistics)] }
                if let m = l.adapter as? RouterStatisticsReporting { return m.routerStatistics.map { (a.name, $0) } }
                return (l.adapter as? MoVLayer).map { [(a.name, $0.statistics)] } ?? []
            } + a.modules.flatMap { m -> [(String, RouterLayerStatistics)] in
                if let p = m.adapter as? PERFTLayer { return [(a.name, p.statistics)] }
                return ((m.adapter as? RouterStatisticsReporting)?.routerStatistics ?? []).map { (a.name, $0) }
            }
        }
    }

    /// Clears the router statistics of every mixture layer (of adapter `name`, or all).
    public func resetRouterStatistics(adapter name: String? = nil) {
        for a in adapters where name == nil || a.name == name {
            for l in a.layers {
                if let m = l.adapter as? LoRAMixtureLayer { m.statistics = RouterLayerStatistics(path: m.path, experts: m.experts) }
                if let m = l.adapter as? MoVLayer { m.statistics = RouterLayerStatistics(path: m.path, experts: m.experts) }
                (l.adapter as? RouterStatisticsReporting)?.resetRouterStatistics()
            }
            for m in a.modules {
                if let p = m.adapter as? PERFTLayer { p.statistics = RouterLayerStatistics(path: p.statistics.path, experts: p.experts) }
                (m.adapter as? RouterStatisticsReporting)?.resetRouterStatistics()
            }
        }
    }

    /// The router statistics as JSON (an array of per-layer objects with an `adapter` field).
    public func routerStatisticsJSON(adapter name: String? = nil) throws -> String {
        let rows: [[String: Any]] = routerStatistics(adapter: name).map { var s = $0.stats.summary; s["adapter"] = $0.adapter; return s }
        let data = try JSONSerialization.data(withJSONObject: rows, options: [.prettyPrinted, .sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }
}
