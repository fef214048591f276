import Foundation
import GraftModels
import GraftTensor
import GraftTrain

/// μP for mixture-of-experts blocks (Małaśnicki et al., 2025, "μ-Parameterization for Mixture of Experts", seed
/// #72): initialisations and per-group Adam learning rates under which a block's feature updates stay the same
/// size as the model widens, so a learning rate tuned on a narrow proxy (``baseWidth``, ``baseExpertWidth``)
/// transfers to the wide model.
///
/// The rules are μP's for Adam (Yang et al., Tensor Programs V, table 3) with each of the block's matrices classed
/// by which of its dimensions grow with width, as the paper classes them: with `d` the model width, `m` the expert
/// width and width multipliers `ρ = d / d₀`, `ρₘ = m / m₀`,
/// - the **router** `[E, d]` maps the growing width to the fixed number of experts, an output-like matrix: initial
///   standard deviation `σ₀/ρ` (variance ∝ 1/fan_in², `σ₀` the proxy's), learning rate `η/ρ`;
/// - the experts' **gate/up** `[E, m, d]` are hidden matrices with fan-in `d`: `1/√d`, `η/ρ`;
/// - the experts' **down** `[E, d, m]` are hidden with fan-in `m`: `1/√m`, `η/ρₘ`;
/// - **biases** (the router's): no change.
/// At `d = d₀`, `m = m₀` every factor is 1 (the proxy is standard parametrization).
public struct MoEMuP: Sendable {
    /// Model width `d₀` of the proxy the learning rate was tuned on.
    public let baseWidth: Int
    /// Expert width `m₀` of the proxy.
    public let baseExpertWidth: Int

    /// The parametrization for a proxy of width `baseWidth` and expert width `baseExpertWidth`; throws unless both
    /// are ≥ 1.
    public init(baseWidth: Int, baseExpertWidth: Int) throws {
        guard baseWidth >= 1, baseExpertWidth >= 1 else {
            throw GraftError.invalid("μP: base width \(baseWidth) and base expert width \(baseExpertWidth) must be ≥ 1")
        }
        self.baseWidth = baseWidth
        self.baseExpertWidth = baseExpertWidth
    }

    /// The parameter groups of an MoE block, by the dimensions that grow with width.
    public enum Role: String, Sendable, CaseIterable {
        /// `router.weight`: width → experts.
        case router
        /// `experts.gate_proj`, `experts.up_proj`: width → expert width.
        case expertInput = "expert_input"
        /// `experts.down_proj`: expert width → width.
        case expertOutput = "expert_output"
        /// `router.bias`.
        case bias
    }

    /// The learning-rate factor of `role` in a block of width `width` and expert width `expertWidth`.
    public func learningRateScale(_ role: Role, width: Int, expertWidth: Int) -> Float {
        switch role {
        case .router, .expertInput: return Float(baseWidth) / Float(max(width, 1))
        case .expertOutput: return Float(baseExpertWidth) / Float(max(expertWidth, 1))
        case .bias: return 1
        }
    }

    /// The initial standard deviation of `role` at width `width`: `scale/√fan_in` for the experts (as the standard
    /// parametrization) and `scale·√d₀/d` for the router (the proxy's `scale/√d₀`, shrunk by `1/ρ`); 0 for the bias.
    public func initialStd(_ role: Role, scale: Float = 1, width: Int, expertWidth: Int) -> Float {
        switch role {
        case .router: return scale * Float(baseWidth).squareRoot() / Float(max(width, 1))
        case .expertInput: return scale / Float(max(width, 1)).squareRoot()
        case .expertOutput: return scale / Float(max(expertWidth, 1)).squareRoot()
        case .bias: return 0
        }
    }

    /// The role of each trainable tensor of `block`.
    public static func roles(of block: MoEFeedForward) -> [(role: Role, tensor: Tensor)] {
        [(.router, block.routerWeight), (.bias, block.routerBias), (.expertInput, block.gateWeight),
         (.expertInput, block.upWeight), (.expertOutput, block.downWeight)]
    }

    /// Draws `block`'s router and experts afresh under μP (normal, the standard deviations of
    /// ``initialStd(_:scale:width:expertWidth:)``; the router bias zero): for MoE blocks trained from scratch.
    public func initialize(_ block: MoEFeedForward, scale: Float = 1, rng: inout GraftRNG) {
        for (role, t) in Self.roles(of: block) {
            let std = initialStd(role, scale: scale, width: block.hiddenSize, expertWidth: block.expertSize)
            for j in 0..<t.count { t.pointer[j] = std == 0 ? 0 : std * rng.nextNormal() }
        }
    }

    /// AdamW over `blocks`' tensors (routers only unless `experts`), each at its μP learning-rate factor, all
    /// marked as requiring gradients.
    public func optimizer(for blocks: [MoEFeedForward], experts: Bool = true, learningRate: Float,
                          weightDecay: Float = 0) -> AdamW {
        var parameters: [Tensor] = [], scales: [Float] = []
        for b in blocks {
            for (role, t) in Self.roles(of: b) where experts || role == .router || role == .bias {
                parameters.append(t.requiringGrad())
                scales.append(learningRateScale(role, width: b.hiddenSize, expertWidth: b.expertSize))
            }
        }
        let adam = AdamW(parameters: parameters, learningRate: learningRate, weightDecay: weightDecay)
        adam.learningRateScales = scales
        return adam
    }
}
