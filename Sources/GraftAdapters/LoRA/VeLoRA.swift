import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// VeLoRA (Miles et al., 2024, "memory-efficient training using rank-1 sub-token projections"; PEFT's
/// `velora_config` on a `LORA` config): the forward is LoRA's, but while training `lora_A`'s input is kept for the
/// backward pass only as one number per group of features — each token's input split into `num_groups` sub-tokens
/// of `⌈in / num_groups⌉` features (zero-padded), each projected on one unit vector `e` (`lora_velora_embed`) — and
/// `lora_A`'s gradient uses the reconstruction `scale · (x_g · e) e` instead of `x`. Input gradients are exact.
///
/// `e` is drawn at random (`init_type: "random"`, kept), or the normalised mean sub-token of the training batch
/// (`"batch_average"`: every training pass; `"batch_average_once"`: the first training pass after creation or
/// loading), as PEFT's `VeloraLinearVariant`. It is saved under PEFT's key. Merging is LoRA's.
final class VeLoRAState {
    let groups: Int
    let scale: Float
    let initType: String
    /// `[⌈in / groups⌉]`, unit norm (zeros until a batch average sets it).
    let embed: Tensor
    var initialized: Bool

    init(inFeatures: Int, options: VeLoRAOptions, rng: inout GraftRNG) {
        groups = options.groups
        scale = options.scale
        initType = options.initType
        let dim = (inFeatures + options.groups - 1) / options.groups
        if options.initType == "random" {
            embed = VeLoRAState.normalized(Tensor.randomNormal([dim], rng: &rng).scalars)
            initialized = true
        } else {
            embed = Tensor(zeros: [dim])
            initialized = false
        }
    }

    /// `v / ‖v‖`, or the normalised ones vector when `v` is zero (PEFT's `_normalize_projection`).
    static func normalized(_ v: [Float]) -> Tensor {
        var norm = v.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
        var values = v
        if norm == 0 {
            values = [Float](repeating: 1, count: v.count)
            norm = Double(v.count).squareRoot()
        }
        return Tensor(shape: [v.count], values: values.map { Float(Double($0) / norm) })
    }

    /// Sets `e` to the normalised mean sub-token of `x` (`[rows, in]` flattened) when the init type asks for it.
    func observe(_ x: Tensor) {
        guard initType != "random", !(initType == "batch_average_once" && initialized) else { return }
        let dim = embed.count, inF = x.shape.last ?? 0
        guard inF > 0 else { return }
        let rows = x.count / inF
        var sums = [Double](repeating: 0, count: dim)
        for r in 0..<rows {
            for c in 0..<inF { sums[c % dim] += Double(x.pointer[r * inF + c]) }
        }
        let count = Double(rows * groups)
        let mean = VeLoRAState.normalized(sums.map { Float($0 / count) })
        embed.pointer.update(from: mean.pointer, count: dim)
        initialized = true
    }

    /// `x Aᵀ` with VeLoRA's backward: `dA = gᵀ · scale·(x_g·e)e`, `dx = g A` (recorded for autograd).
    func project(_ x: Tensor, _ a: Tensor) -> Tensor {
        let out = withNoGrad { linear(x, a) }
        let inF = a.shape[1], r = a.shape[0], dim = embed.count
        let rows = x.count / inF
        // The compressed input: one value per (row, group).
        var compressed = [Float](repeating: 0, count: rows * groups)
        for row in 0..<rows {
            for c in 0..<inF { compressed[row * groups + c / dim] += x.pointer[row * inF + c] * embed.pointer[c % dim] }
        }
        let e = embed.scalars, s = scale, xShape = x.shape
        return Tensor.result(out, inputs: [x, a]) { g in
            var gx: Tensor?
            if x.requiresGrad { gx = withNoGrad { matmul(g.reshaped([rows, r]), a) }.reshaped(xShape) }
            var ga: Tensor?
            if a.requiresGrad {
                let rec = Tensor(zeros: [rows, inF])
                for row in 0..<rows {
                    for c in 0..<inF { rec.pointer[row * inF + c] = s * compressed[row * self.groups + c / dim] * e[c % dim] }
                }
                ga = withNoGrad { matmul(g.reshaped([rows, r]), rec, transposeA: true) }
            }
            return [gx, ga]
        }
    }
}

/// `velora_config` (`num_groups`, `scale`, `init_type`).
struct VeLoRAOptions: Equatable {
    var groups: Int
    var scale: Float
    var initType: String

    /// `velora_config` of `config`, or nil when absent or null.
    static func parse(_ config: AdapterConfig) throws -> VeLoRAOptions? {
        guard let value = config.value("velora_config"), !(value is NSNull) else { return nil }
        guard let object = value as? [String: Any] else {
            throw GraftError.invalid("\(config.source): 'velora_config' must be an object {\"num_groups\", \"scale\", \"init_type\"} or null, got \(JSONScalar.describe(value))")
        }
        if let unknown = object.keys.sorted().first(where: { !["num_groups", "scale", "init_type"].contains($0) }) {
            throw GraftError(.unsupported, "\(config.source): 'velora_config.\(unknown)' is not a VeLoRA setting (num_groups, scale, init_type)")
        }
        var options = VeLoRAOptions(groups: 64, scale: 1, initType: "batch_average")
        if let raw = object["num_groups"], !(raw is NSNull) {
            guard let n = JSONScalar.integer(raw), n > 0, n <= AdapterConfig.maximumSize else {
                throw GraftError.invalid("\(config.source): 'velora_config.num_groups' must be a positive integer, got \(JSONScalar.describe(raw))")
            }
            options.groups = n
        }
        if let raw = object["scale"], !(raw is NSNull) {
            guard let s = JSONScalar.number(raw), s.isFinite, s > 0 else {
                throw GraftError.invalid("\(config.source): 'velora_config.scale' must be a positive number, got \(JSONScalar.describe(raw))")
            }
            options.scale = Float(s)
        }
        if let raw = object["init_type"], !(raw is NSNull) {
            guard let t = raw as? String, ["batch_average", "batch_average_once", "random"].contains(t) else {
                throw GraftError.invalid("\(config.source): 'velora_config.init_type' must be \"batch_average\", \"batch_average_once\" or \"random\", got \(JSONScalar.describe(raw))")
            }
            options.initType = t
        }
        return options
    }

    /// PEFT's rule: VeLoRA is its own LoRA variant (no DoRA, KaSA or aLoRA with it); Graft also keeps it to the
    /// plain initialisations and to trainable A.
    static func validate(_ config: AdapterConfig) throws {
        guard try parse(config) != nil else { return }
        for key in ["use_dora", "kasa_config", "alora_invocation_tokens"] where !(config.value(key) is NSNull) && config.value(key) != nil
            && JSONScalar.bool(config.value(key)) != false {
            throw GraftError(.unsupported, "\(config.source): 'velora_config' (VeLoRA) cannot be combined with '\(key)' (PEFT has no such variant)")
        }
        if let initial = config.value("init_lora_weights"), !(initial is NSNull), JSONScalar.bool(initial) == nil,
           (initial as? String) != "gaussian" {
            throw GraftError(.unsupported, "\(config.source): 'velora_config' (VeLoRA) with init_lora_weights \(JSONScalar.describe(initial)) is not supported yet (use true, false or \"gaussian\")")
        }
        if config.value("train_a") != nil, !(try config.bool("train_a", default: true)) {
            throw GraftError(.unsupported, "\(config.source): 'velora_config' (VeLoRA) compresses lora_A's gradient; with train_a false it has nothing to do")
        }
    }
}
