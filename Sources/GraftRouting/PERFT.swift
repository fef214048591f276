import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

/// PERFT-R (Liu et al., 2024, "PERFT: Parameter-Efficient Routed Fine-Tuning for Mixture-of-Expert Model",
/// seed #4) on one MoE block: `N` LoRA experts with a router of their own, parallel to the block's routed FFN
/// experts. Per token `g = softmax(W_p x)` over the `N` PEFT experts, the `k` most probable are kept, and the
/// block's output gains `Σ_{i ∈ top-k} g_i · (α/r) · B_i A_i x` (with `normalize_gates`, the kept gates are
/// renormalized to sum to 1). The MoE block itself (router, experts) stays frozen.
///
/// Parameters (Graft keys, no PEFT equivalent): `mlp.peft_experts.router.weight` `[N, hidden]`,
/// `mlp.peft_experts.lora_A` `[N, r, hidden]`, `mlp.peft_experts.lora_B` `[N, hidden, r]`. B starts at zero, so a
/// new adapter leaves the block's output exactly as it was. Every forward updates ``statistics`` (load, entropy, …).
public final class PERFTLayer: MoEBlockModuleAdapter {
    public let state: AdapterState
    /// The MoE block the PEFT experts sit in.
    public let block: MoEFeedForward
    /// The PEFT experts' router `[N, hidden]`.
    public let router: Tensor
    /// Down-projections `[N, r, hidden]`.
    public let loraA: Tensor
    /// Up-projections `[N, hidden, r]`.
    public let loraB: Tensor
    /// `α / r`.
    public let scaling: Float
    /// PEFT experts each token runs.
    public let topK: Int
    /// Renormalize the kept gates to sum to 1.
    public let normalizeGates: Bool
    /// What the PEFT router did since the statistics were last reset.
    public var statistics: RouterLayerStatistics

    /// `experts` LoRA experts of rank `rank` in `block`: router and A Kaiming-uniform (bound `1/√hidden`), B zero.
    public init(block: MoEFeedForward, path: String, experts: Int, rank: Int, alpha: Float, topK: Int, normalizeGates: Bool,
                state: AdapterState) {
        self.state = state
        self.block = block
        let h = block.hiddenSize
        let bound = 1 / Float(h).squareRoot()
        router = Tensor.randomUniform([experts, h], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        loraA = Tensor.randomUniform([experts, rank, h], low: -bound, high: bound, rng: &state.rng).requiringGrad()
        loraB = Tensor(zeros: [experts, h, rank]).requiringGrad()
        scaling = alpha / Float(rank)
        self.topK = topK
        self.normalizeGates = normalizeGates
        statistics = RouterLayerStatistics(path: path + ".mlp.peft_experts", experts: experts)
    }

    /// PEFT experts `N`.
    public var experts: Int { router.shape[0] }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("mlp.peft_experts.router.weight", router), ("mlp.peft_experts.lora_A", loraA), ("mlp.peft_experts.lora_B", loraB)]
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var replacedExperts: ReplacedExperts? { nil }
    public var mergeable: Bool { false }
    public var notMergeableReason: String { "its experts are routed per token" }

    /// `Σ_{top-k} g_i · s · B_i A_i x` for `x` `[T, hidden]`, recorded for autograd (router, A, B, x).
    public func addedOutput(_ x: Tensor) -> Tensor? {
        let tokens = x.rows
        guard tokens > 0 else { return nil }
        let probs = softmax(linear(x, router))
        let plan = RoutePlan.make(probs: UnsafeBufferPointer(start: probs.pointer, count: probs.count), tokens: tokens,
                                  experts: experts, mode: topK >= experts ? .soft : .topK, topK: topK, topP: 1, capacityFactor: nil)
        var gates = probs
        if topK < experts {
            let shape = probs.shape
            let kept = probs * Tensor(shape: shape, values: plan.dispatched)
            if normalizeGates {
                let total = matmul(kept, Tensor(repeating: 1, shape: [experts, 1])) + Tensor(repeating: 1e-9, shape: [1])
                gates = kept * reciprocal(total)
            } else {
                gates = kept
            }
        }
        statistics.record(probs: probs, gates: gates, plan: plan)
        return routedLoRAExperts(x, a: loraA, b: loraB, gates: gates, rows: plan.rows, scaling: scaling)
    }

}

/// PERFT-R (`peft_type: "PERFT"`, Graft's own type) on every MoE block of an MoE base. Keys: `num_experts` (4
/// PEFT experts per layer), `top_k` (2; `top_k ≥ num_experts` runs every expert, soft), `r` (8), `lora_alpha`
/// (16; scaling `α/r`), `normalize_gates` (false: the kept gates are the router's softmax probabilities).
public enum PERFTFactory: ModuleAdapterFactory {
    public static let peftType = "PERFT"
    public static let family = "routed LoRA experts inside an MoE block (PERFT-R)"
    public static var selectsLayers: Bool { true }
    public static var requiresDecoder: Bool { true }
    public static var mergeable: Bool { false }

    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8]
    }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let n = try config.int("num_experts", default: 4)
        guard n >= 1 else { throw GraftError.invalid("\(config.source): 'num_experts' must be ≥ 1, got \(n)") }
        let k = try config.int("top_k", default: 2)
        guard k >= 1 else { throw GraftError.invalid("\(config.source): 'top_k' must be ≥ 1, got \(k)") }
        let r = try config.int("r", default: 8)
        guard r >= 1 else { throw GraftError.invalid("\(config.source): 'r' must be ≥ 1, got \(r)") }
        let alpha = try config.double("lora_alpha", default: 16)
        guard alpha.isFinite else { throw GraftError.invalid("\(config.source): 'lora_alpha' must be finite, got \(alpha)") }
        let normalize = try config.bool("normalize_gates", default: false)
        guard let layer = module as? LlamaDecoderLayer else { return nil }
        // Layers without an MoE block (an MoE base made of some layers only) are skipped; a model with none is
        // refused by AdaptedModel.
        guard let block = layer.feedForwardOverride as? MoEFeedForward else { return nil }
        return PERFTLayer(block: block, path: path, experts: n, rank: r, alpha: Float(alpha), topK: min(k, n),
                          normalizeGates: normalize, state: state)
    }
}
