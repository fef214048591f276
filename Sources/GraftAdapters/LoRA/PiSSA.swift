import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// SVD-based LoRA initializations, selected with LoRA's `init_lora_weights`:
///
/// - `"pissa"` (PiSSA, Meng et al., 2024; PEFT's value): from the top-r singular triplets of `W`,
///   `B = U_r (S_r/s)^{1/2}`, `A = (S_r/s)^{1/2} V_rᵀ`, so `s·B A` is the best rank-r approximation of `W`.
///   `"pissa_niter_<n>"` (PEFT's randomized SVD) is accepted and computed with the exact SVD.
/// - `"milora"` (MiLoRA, Wang et al., 2024; a Graft value, PEFT has none): the same from the bottom-r
///   (minor) singular triplets.
/// - `"corda"` (CorDA; PEFT's value): from the SVD of `W·C` with `C` the input covariance, see `CorDA.swift`.
/// - `"olora"` (OLoRA; PEFT's value): from the QR decomposition of `W`, see `OLoRA.swift` (not an SVD, but the
///   same residual mechanics).
///
/// These methods train on the residual `W − s·B₀A₀` (`B₀`, `A₀` the initial factors). Graft keeps the base
/// weight intact and subtracts `s·B₀A₀x` in the layer instead (``LoRALayer/initialFactors``), so right after
/// initialization the model's output equals the base model's, merge adds `ΔW = s(BA − B₀A₀)`, and unmerge
/// restores the base exactly (up to float addition).
///
/// Saving writes the equivalent plain LoRA for the unmodified base, as PEFT's
/// `save_pretrained(path_initial_model_for_weight_conversion=...)` does: rank `2r` with
/// `lora_A = [A; A₀]`, `lora_B = [B, −B₀]`, `lora_alpha` doubled (×√2 with rsLoRA, keeping the scaling),
/// `rank_pattern` / `alpha_pattern` scaled alike and `init_lora_weights: true`. PEFT's LoRA loader reads the
/// file, and loading it back into Graft reproduces the outputs. Loading that file into an adapter created with
/// the same SVD-based config (a trainer checkpoint resumed with ``AdaptedModel/loadWeights(_:into:)``) splits it
/// back into the trained factors and the frozen initial ones.
enum SVDInitialization: Equatable {
    /// Top-r singular triplets of W.
    case pissa
    /// Bottom-r (minor) singular triplets of W.
    case milora
    /// Singular triplets of W·C (CorDA), initialized from data by `AdaptedModel.initializeCorDA`.
    case corda
    /// The first r columns of Q and rows of R in W = QR (OLoRA).
    case olora

    /// Parses `init_lora_weights`; nil for booleans, `"gaussian"` and absent values (initializations drawn at random).
    static let supported = #"true, false, "gaussian", "pissa", "pissa_niter_<n>", "milora", "corda", "olora", "eva", "lora_ga", "loftq""#

    static func parse(_ value: Any?, source: String) throws -> SVDInitialization? {
        switch value {
        case nil, is NSNull: return nil
        case let b? where JSONScalar.isBool(b): return nil
        case let s as String:
            if s == "pissa" || (s.hasPrefix("pissa_niter_") && Int(s.dropFirst("pissa_niter_".count)).map { $0 >= 0 } == true) { return .pissa }
            if s == "milora" { return .milora }
            if s == "corda" { return .corda }
            if s == "olora" { return .olora }
            // EVA / LoRA-GA: default LoRA until AdaptedModel.initializeEVA / initializeLoRAGA (EVA.swift, LoRAGA.swift).
            if s == "gaussian" || s == "eva" || s == "lora_ga" || s == "loftq" { return nil }  // LoftQ: LoftQ.swift.
            throw GraftError(.unsupported, "\(source): init_lora_weights \"\(s)\" is not supported (\(supported))")
        case let other?:
            throw GraftError(.unsupported, "\(source): init_lora_weights \(other) is not supported (\(supported))")
        }
    }
}

extension LoRALayer {
    /// Initializes from the singular triplets `indices` of `u · diag(s) · vt` (`u: [out, k]`, `vt: [k, in]`):
    /// `B[:, j] = u[:, i_j] √(s_{i_j}/scaling)`, `A[j, :] = √(s_{i_j}/scaling) vt[i_j, :]`, and records the
    /// frozen copies that keep the layer's output at the base's.
    func initializeFromTriplets(u: Tensor, s: Tensor, vt: Tensor, indices: [Int]) {
        let outF = loraB.shape[0], inF = loraA.shape[1], k = s.count
        let pa = loraA.pointer, pb = loraB.pointer, pu = u.pointer, pv = vt.pointer
        for (j, i) in indices.enumerated() {
            let f = (max(s.pointer[i], 0) / scaling).squareRoot()
            for o in 0..<outF { pb[o * rank + j] = pu[o * k + i] * f }
            for c in 0..<inF { pa[j * inF + c] = pv[i * inF + c] * f }
        }
        initialFactors = (loraA.copy(), loraB.copy())
    }

    /// PiSSA / MiLoRA: the top or bottom `r` singular triplets of the base weight.
    func initializeFromWeightSVD(base: Linear, minor: Bool, path: String) throws {
        let k = min(base.inFeatures, base.outFeatures)
        guard rank <= k else {
            throw GraftError.invalid("\(path): rank \(rank) exceeds the layer's \(k) singular values (\(base.outFeatures)×\(base.inFeatures))")
        }
        let (u, s, vt) = try svd(base.weight, what: "the weight of '\(path)'")
        initializeFromTriplets(u: u, s: s, vt: vt, indices: minor ? Array((k - rank)..<k) : Array(0..<rank))
    }
}

extension LoRALayer {
    /// Loads one half of the converted rank-`2r` form ``NamedAdapter/exportedLoRA()`` writes back into this
    /// SVD-initialized layer (a trainer checkpoint of PiSSA / MiLoRA / CorDA): `lora_A` `[2r, in]` → `A`, `A₀`;
    /// `lora_B` `[out, 2r]` → `B`, `−B₀`. Returns false when the tensor has the plain rank-`r` shape.
    func loadConvertedFactor(_ name: String, from tensor: Tensor) throws -> Bool {
        guard let (a0, b0) = initialFactors else { return false }
        let inF = loraA.shape[1], outF = loraB.shape[0], r = rank
        switch name {
        case "lora_A.weight" where tensor.shape == [2 * r, inF]:
            loraA.pointer.update(from: tensor.pointer, count: r * inF)
            a0.pointer.update(from: tensor.pointer + r * inF, count: r * inF)
            return true
        case "lora_B.weight" where tensor.shape == [outF, 2 * r]:
            for o in 0..<outF {
                for j in 0..<r {
                    loraB.pointer[o * r + j] = tensor.pointer[o * 2 * r + j]
                    b0.pointer[o * r + j] = -tensor.pointer[o * 2 * r + r + j]
                }
            }
            return true
        default:
            return false
        }
    }
}

extension NamedAdapter {
    /// For an SVD-initialized LoRA, the state dict and config of the equivalent plain rank-`2r` LoRA on the
    /// unmodified base (see `SVDInitialization`); nil for every other adapter.
    /// Asymmetric LoRA is written as a `LORA` config with `train_a: false` (see `AsymmetricLoRA.swift`).
    func exportedLoRA() throws -> (stateDict: [(key: String, tensor: Tensor)], config: AdapterConfig)? {
        if config.peftType == AsymmetricLoRAFactory.peftType { return (peftStateDict, try AsymmetricLoRAFactory.savedConfig(config)) }
        // IncreLoRA / TriAdaptLoRA: plain LoRA with a rank_pattern (see `RankGrowth.swift`).
        if let grown = try exportedGrowingRankLoRA() { return grown }
        guard config.peftType == LoRAFactory.peftType,
              layers.contains(where: { ($0.adapter as? LoRALayer)?.initialFactors != nil }) else { return nil }
        var dict: [(key: String, tensor: Tensor)] = []
        for (path, _, adapter) in layers {
            guard let lora = adapter as? LoRALayer, let (a0, b0) = lora.initialFactors else {
                throw GraftError(.internalError, "\(path): SVD-initialized adapter has a layer without initial factors")
            }
            let inF = lora.loraA.shape[1], outF = lora.loraB.shape[0], r = lora.rank
            let a = Tensor(zeros: [2 * r, inF]), b = Tensor(zeros: [outF, 2 * r])
            a.pointer.update(from: lora.loraA.pointer, count: r * inF)
            (a.pointer + r * inF).update(from: a0.pointer, count: r * inF)
            for o in 0..<outF {
                for j in 0..<r {
                    b.pointer[o * 2 * r + j] = lora.loraB.pointer[o * r + j]
                    b.pointer[o * 2 * r + r + j] = -b0.pointer[o * r + j]
                }
            }
            dict.append(("base_model.model.\(path).lora_A.weight", a))
            dict.append(("base_model.model.\(path).lora_B.weight", b))
        }
        // trainable_token_indices rows travel unchanged.
        for (path, m) in modules { for (n, t) in m.exportedParameters { dict.append((m.key(n, path: path), t)) } }
        var json = config.json
        let rsLoRA = try config.bool("use_rslora", default: false)
        let alphaFactor = rsLoRA ? Double(2).squareRoot() : 2
        json["r"] = 2 * (try config.int("r", default: 8))
        json["lora_alpha"] = alphaFactor * (try config.double("lora_alpha", default: 8))
        let ranks = try config.patternMap("rank_pattern"), alphas = try config.patternMap("alpha_pattern")
        if !ranks.isEmpty { json["rank_pattern"] = Dictionary(ranks.map { ($0.pattern, Int($0.value) * 2) }, uniquingKeysWith: { a, _ in a }) }
        if !alphas.isEmpty { json["alpha_pattern"] = Dictionary(alphas.map { ($0.pattern, $0.value * alphaFactor) }, uniquingKeysWith: { a, _ in a }) }
        json["init_lora_weights"] = true
        json["corda_config"] = nil
        return (dict, try AdapterConfig(json: json, source: config.source))
    }
}
