import GraftTensor

/// How a mixture layer sends tokens to its experts.
public enum ExpertRoutingMode: String, Sendable, CaseIterable {
    /// Every expert, weighted by the router's softmax (MoV / MoLoRA).
    case soft
    /// Each token's `k` most probable experts, within a per-expert capacity (SiRA).
    case topK = "top_k"
    /// Each token's smallest set of most probable experts whose probability reaches `p` (dynamic routing).
    case topP = "top_p"
}

/// Which experts each token of one forward pass uses: the router's decisions before and after capacity.
public struct RoutePlan: Sendable {
    /// Tokens routed.
    public let tokens: Int
    /// Experts of the layer.
    public let experts: Int
    /// `[tokens · experts]`: 1 where the router selected the expert for the token (before capacity).
    public var selected: [Float]
    /// `[tokens · experts]`: 1 where the token is actually sent to the expert (after capacity).
    public var dispatched: [Float]
    /// Per expert, the tokens sent to it in increasing order; nil means every token (soft routing).
    public var rows: [[Int32]?]
    /// Per expert, the selections that exceeded its capacity and were dropped.
    public var overflow: [Int]
    /// The per-expert capacity used (nil: unlimited).
    public var capacity: Int?

    /// Indices of `probs` (one token's expert probabilities) from most to least probable; ties keep index order.
    public static func ranking(_ probs: UnsafeBufferPointer<Float>) -> [Int] {
        probs.indices.sorted { probs[$0] > probs[$1] || (probs[$0] == probs[$1] && $0 < $1) }
    }

    /// The smallest prefix of the experts sorted by probability whose cumulative probability reaches `p`
    /// (at least one expert; all when rounding keeps the sum below `p`).
    public static func topPSet(_ probs: UnsafeBufferPointer<Float>, p: Float) -> [Int] {
        let order = ranking(probs)
        var mass: Float = 0
        var out: [Int] = []
        for e in order {
            out.append(e)
            mass += probs[e]
            if mass >= p { break }
        }
        return out
    }

    /// The per-expert capacity `ceil(c · T · k / E)` of SiRA / GShard.
    public static func capacity(factor c: Float, tokens: Int, k: Int, experts: Int) -> Int {
        Int((c * Float(tokens) * Float(k) / Float(max(experts, 1))).rounded(.up))
    }

    /// Routes `tokens` tokens given their probabilities `probs` (`[tokens · experts]`, row-major).
    ///
    /// Top-k with a capacity factor `c > 0` assigns in priority order — every token's first choice in token
    /// order, then every second choice, ... — and a selection whose expert is already full overflows: that
    /// token skips that expert. `c == 0` (or nil) means no capacity.
    public static func make(probs: UnsafeBufferPointer<Float>, tokens: Int, experts: Int, mode: ExpertRoutingMode,
                            topK: Int, topP: Float, capacityFactor: Float?) -> RoutePlan {
        let total = tokens * experts
        var plan = RoutePlan(tokens: tokens, experts: experts, selected: [Float](repeating: 0, count: total),
                             dispatched: [Float](repeating: 0, count: total), rows: [],
                             overflow: [Int](repeating: 0, count: experts), capacity: nil)
        switch mode {
        case .soft:
            plan.selected = [Float](repeating: 1, count: total)
            plan.dispatched = plan.selected
            plan.rows = [[Int32]?](repeating: nil, count: experts)
            return plan
        case .topP:
            var rows = [[Int32]](repeating: [], count: experts)
            for t in 0..<tokens {
                let row = UnsafeBufferPointer(rebasing: probs[(t * experts)..<((t + 1) * experts)])
                for e in topPSet(row, p: topP) {
                    plan.selected[t * experts + e] = 1
                    plan.dispatched[t * experts + e] = 1
                    rows[e].append(Int32(t))
                }
            }
            plan.rows = rows
            return plan
        case .topK:
            let k = min(max(topK, 1), experts)
            var choices: [[Int]] = []
            choices.reserveCapacity(tokens)
            for t in 0..<tokens {
                let row = UnsafeBufferPointer(rebasing: probs[(t * experts)..<((t + 1) * experts)])
                let top = Array(ranking(row).prefix(k))
                for e in top { plan.selected[t * experts + e] = 1 }
                choices.append(top)
            }
            var cap = Int.max
            if let c = capacityFactor, c > 0 {
                cap = capacity(factor: c, tokens: tokens, k: k, experts: experts)
                plan.capacity = cap
            }
            var load = [Int](repeating: 0, count: experts)
            for rank in 0..<k {
                for t in 0..<tokens {
                    let e = choices[t][rank]
                    if load[e] < cap {
                        load[e] += 1
                        plan.dispatched[t * experts + e] = 1
                    } else {
                        plan.overflow[e] += 1
                    }
                }
            }
            var rows = [[Int32]](repeating: [], count: experts)
            for e in 0..<experts { rows[e].reserveCapacity(load[e]) }
            for t in 0..<tokens {
                for e in 0..<experts where plan.dispatched[t * experts + e] != 0 { rows[e].append(Int32(t)) }
            }
            plan.rows = rows
            return plan
        }
    }
}
