import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Accumulates a layer's input moments over forward calls for EVA: the row count, `Σ x` and `Σ xᵀx`, in Float64.
final class InputMomentCollector {
    let width: Int
    var rows = 0
    var sums: [Double]
    var products: [Double]

    init(width: Int) {
        self.width = width
        sums = [Double](repeating: 0, count: width)
        products = [Double](repeating: 0, count: width * width)
    }

    /// Adds one forward call's input `[..., width]` (every row: Graft packs sequences, so there is no padding).
    func add(_ x: Tensor) {
        withNoGrad {
            let n = x.count / width
            guard n > 0 else { return }
            let xs = x.reshaped([n, width])
            let c = matmul(xs, xs, transposeA: true)
            for i in 0..<(width * width) { products[i] += Double(c.pointer[i]) }
            for r in 0..<n { for j in 0..<width { sums[j] += Double(xs.pointer[r * width + j]) } }
            rows += n
        }
    }

    /// The principal components of the centred inputs: rows of `components` (`[k, width]`, signs as PEFT's
    /// `svd_flip`: the largest-magnitude entry of each row positive), the scatter's eigenvalues (`S²` of the
    /// centred data) and their ratio to its trace (PEFT's `explained_variance_ratio_`).
    func principalComponents(what: String) throws -> (components: Tensor, squaredSingularValues: [Double], ratios: [Double]) {
        let n = Double(rows), w = width
        var scatter = [Float](repeating: 0, count: w * w)
        var trace = 0.0
        for i in 0..<w {
            for j in 0..<w {
                let v = products[i * w + j] - sums[i] * sums[j] / n
                scatter[i * w + j] = Float(v)
                if i == j { trace += v }
            }
        }
        let (_, s, vt) = try svd(Tensor(shape: [w, w], values: scatter), what: what)
        let k = s.count
        for row in 0..<k {
            var peak: Float = 0
            for j in 0..<w where abs(vt.pointer[row * w + j]) > abs(peak) { peak = vt.pointer[row * w + j] }
            if peak < 0 { for j in 0..<w { vt.pointer[row * w + j] = -vt.pointer[row * w + j] } }
        }
        let eigen = s.scalars.map(Double.init)
        return (vt, eigen, eigen.map { trace > 0 ? $0 / trace : 0 })
    }
}

/// `eva_config` (PEFT's `EvaConfig`): `rho` (≥ 1), `tau`, `use_label_mask`, `label_mask_value`, `whiten`,
/// `adjust_scaling_factors`.
struct EVAOptions {
    var rho = 2.0
    var whiten = false
    var adjustScalingFactors = true

    static func parse(_ config: AdapterConfig) throws -> EVAOptions {
        var options = EVAOptions()
        guard let raw = config.value("eva_config"), !(raw is NSNull) else { return options }
        guard let dict = raw as? [String: Any] else { throw GraftError.invalid("\(config.source): 'eva_config' must be an object, got \(raw)") }
        let known: Set = ["rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors"]
        if let unknown = dict.keys.sorted().first(where: { !known.contains($0) }) {
            throw GraftError(.unsupported, "\(config.source): eva_config.\(unknown) is not an EvaConfig field (\(known.sorted().joined(separator: ", ")))")
        }
        if let rho = dict["rho"] {
            guard let v = JSONScalar.number(rho), v >= 1, v.isFinite else { throw GraftError.invalid("\(config.source): eva_config.rho must be a number ≥ 1, got \(JSONScalar.describe(rho))") }
            options.rho = v
        }
        if let tau = dict["tau"], JSONScalar.number(tau) == nil {
            throw GraftError.invalid("\(config.source): eva_config.tau must be a number, got \(JSONScalar.describe(tau))")
        }
        for key in ["use_label_mask", "whiten", "adjust_scaling_factors"] {
            if let v = dict[key], JSONScalar.bool(v) == nil { throw GraftError.invalid("\(config.source): eva_config.\(key) must be true or false, got \(JSONScalar.describe(v))") }
        }
        options.whiten = JSONScalar.bool(dict["whiten"]) ?? false
        options.adjustScalingFactors = JSONScalar.bool(dict["adjust_scaling_factors"]) ?? true
        return options
    }
}

/// EVA (explained variance adaptation; PEFT's `init_lora_weights: "eva"` and `initialize_lora_eva_weights`).
///
/// While `run` makes forward passes, every layer of the adapter collects its inputs' moments; `A` of each layer
/// becomes the top principal components of its centred inputs (divided by √S with `whiten`), `B` stays zero. The
/// ranks are redistributed as PEFT does: each layer offers its first `round(r·rho)` explained-variance ratios, the
/// largest `Σ r` over all layers win, and a layer's rank is how many of its own won (layers reading the same input,
/// such as query and value, offer the same ratios; ties go to the earlier layer, as PEFT's swap gives the layer
/// holding the SVD the larger rank). With `adjust_scaling_factors` the alpha follows the rank (`α·r'/r`). The
/// adapter is rebuilt with those ranks as `rank_pattern` / `alpha_pattern` and rank-0 layers left out of
/// `target_modules`, the config PEFT saves. PEFT fits an incremental randomized PCA over batches until the
/// components stop moving (cosine ≥ `tau`); Graft computes the exact PCA of everything `run` passes, so the two agree
/// on a subspace to the incremental fit's tolerance, not bit for bit. Padding rows are not skipped (Graft packs
/// sequences, so there are none); `use_label_mask`, `label_mask_value` and `tau` only steer PEFT's sampling.
extension AdaptedModel {
    /// Initializes the EVA LoRA adapter `name` from the inputs its layers see while `run` executes forward passes.
    /// Returns each layer's new rank by path (0 for layers EVA removes).
    @discardableResult
    public func initializeEVA(_ name: String, seed: UInt64 = 0, run: () throws -> Void) throws -> [String: Int] {
        let a = try adapter(name)
        guard a.config.peftType == LoRAFactory.peftType, (a.config.value("init_lora_weights") as? String) == "eva" else {
            throw GraftError.invalid("adapter '\(name)' is not an EVA LoRA (init_lora_weights \"eva\")")
        }
        guard !a.state.isMerged else { throw GraftError(.state, "adapter '\(name)' is merged; unmerge it before initializing EVA") }
        let options = try EVAOptions.parse(a.config)
        var layers: [(path: String, lora: LoRALayer, rank: Int, alpha: Float)] = []
        for (path, _, layer) in a.layers {
            guard let lora = layer as? LoRALayer else { throw GraftError(.internalError, "\(path): EVA layer is not LoRA") }
            let (r, alpha) = try LoRAFactory.rankAndAlpha(a.config, path: path, alphaKey: "lora_alpha")
            lora.momentCollector = InputMomentCollector(width: lora.loraA.shape[1])
            layers.append((path, lora, r, alpha))
        }
        defer { for l in layers { l.lora.momentCollector = nil } }
        try withNoGrad { try run() }
        var pcs: [(components: Tensor, squared: [Double], ratios: [Double])] = []
        for l in layers {
            guard let c = l.lora.momentCollector, c.rows > 0 else {
                throw GraftError.invalid("EVA: no forward pass went through '\(l.path)' while collecting its inputs")
            }
            let pc = try c.principalComponents(what: "EVA inputs of '\(l.path)'")
            pcs.append((pc.components, pc.squaredSingularValues, pc.ratios))
        }
        // The rank budget Σ r goes to the largest ratios among each layer's first round(r·rho).
        var offers: [(layer: Int, order: Int, ratio: Double)] = []
        for (i, l) in layers.enumerated() {
            let limit = min(Int((Double(l.rank) * options.rho).rounded(.toNearestOrEven)), pcs[i].ratios.count)
            for j in 0..<limit { offers.append((i, j, pcs[i].ratios[j])) }
        }
        offers.sort { $0.ratio != $1.ratio ? $0.ratio > $1.ratio : ($0.layer, $0.order) < ($1.layer, $1.order) }
        let budget = layers.reduce(0) { $0 + $1.rank }
        var ranks = [Int](repeating: 0, count: layers.count)
        for offer in offers.prefix(budget) { ranks[offer.layer] += 1 }

        var json = a.config.json
        let baseRank = try a.config.int("r", default: 8)
        let baseAlpha = try a.config.double("lora_alpha", default: 8)
        var rankPattern: [String: Any] = [:], alphaPattern: [String: Any] = [:], targets: [String] = []
        for (i, l) in layers.enumerated() where ranks[i] > 0 {
            targets.append(l.path)
            let alpha = options.adjustScalingFactors ? Double(l.alpha) * Double(ranks[i]) / Double(l.rank) : Double(l.alpha)
            if ranks[i] != baseRank { rankPattern[l.path] = ranks[i] }
            if alpha != baseAlpha { alphaPattern[l.path] = alpha }
        }
        guard !targets.isEmpty else { throw GraftError.invalid("EVA: every layer of '\(name)' got rank 0") }
        json["target_modules"] = targets
        json["rank_pattern"] = rankPattern
        json["alpha_pattern"] = alphaPattern
        json["layers_to_transform"] = nil
        json["layers_pattern"] = nil
        let wasActive = activeAdapter == name
        try deleteAdapter(name)
        let rebuilt = try addAdapter(name, config: AdapterConfig(json: json, source: a.config.source), seed: seed)
        if wasActive { try setActiveAdapter(name) }
        var result: [String: Int] = [:]
        for (i, l) in layers.enumerated() { result[l.path] = ranks[i] }
        for (path, _, layer) in rebuilt.layers {
            guard let i = layers.firstIndex(where: { $0.path == path }), let lora = layer as? LoRALayer else { continue }
            let r = ranks[i], w = lora.loraA.shape[1]
            guard lora.loraA.shape[0] == r else { throw GraftError(.internalError, "EVA: '\(path)' rebuilt with rank \(lora.loraA.shape[0]), expected \(r)") }
            for k in 0..<r {
                let scale = options.whiten ? 1 / Float(pcs[i].squared[k].squareRoot().squareRoot()) : 1
                for j in 0..<w { lora.loraA.pointer[k * w + j] = pcs[i].components.pointer[k * w + j] * scale }
            }
            for p in 0..<lora.loraB.count { lora.loraB.pointer[p] = 0 }
        }
        rebuilt.pendingDataInitialization = nil
        return result
    }
}
