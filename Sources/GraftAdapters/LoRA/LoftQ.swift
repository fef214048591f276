import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// `loftq_config` (PEFT's `LoftQConfig`): `loftq_bits` (4 or 8), `loftq_iter` (≥ 1).
struct LoftQOptions {
    var bits = 4
    var iterations = 1

    /// Graft's quantizer for the bit width: Q4_1 for 4 bits, Q8_0 for 8 (both blocks of 32, as GGUF stores them).
    var format: GGMLType { bits == 4 ? .q4_1 : .q8_0 }

    static func parse(_ config: AdapterConfig) throws -> LoftQOptions {
        var options = LoftQOptions()
        guard let raw = config.value("loftq_config"), !(raw is NSNull) else { return options }
        guard let dict = raw as? [String: Any] else { throw GraftError.invalid("\(config.source): 'loftq_config' must be an object, got \(raw)") }
        if let unknown = dict.keys.sorted().first(where: { !["loftq_bits", "loftq_iter"].contains($0) }) {
            throw GraftError(.unsupported, "\(config.source): loftq_config.\(unknown) is not a LoftQConfig field (loftq_bits, loftq_iter)")
        }
        if let b = dict["loftq_bits"] {
            guard let v = JSONScalar.integer(b), v == 4 || v == 8 else {
                throw GraftError.invalid("\(config.source): loftq_config.loftq_bits must be 4 or 8, got \(JSONScalar.describe(b))")
            }
            options.bits = v
        }
        if let n = dict["loftq_iter"] {
            guard let v = JSONScalar.integer(n), v >= 1, v <= 100 else {
                throw GraftError.invalid("\(config.source): loftq_config.loftq_iter must be an integer in 1...100, got \(JSONScalar.describe(n))")
            }
            options.iterations = v
        }
        return options
    }
}

/// `count` floats through Graft's quantizer `format` and back (`count` a multiple of its block size).
func quantizeRoundTrip(_ values: Tensor, format: GGMLType, what: String) throws -> Tensor {
    let count = values.count
    guard count % format.blockSize == 0 else {
        throw GraftError.invalid("\(what): \(count) weights are not a whole number of \(format.name) blocks of \(format.blockSize)")
    }
    var bytes = [UInt8](repeating: 0, count: count / format.blockSize * format.typeSize)
    let out = Tensor(zeros: values.shape)
    try bytes.withUnsafeMutableBytes { raw in
        guard let base = raw.baseAddress else { return }
        try format.quantize(values.pointer, into: base, count: count)
        try format.dequantize(base, into: out.pointer, count: count)
    }
    return out
}

/// LoftQ (Li et al., 2023; PEFT's `init_lora_weights: "loftq"`, `loftq_config`) with Graft's own quantizer: the base
/// weight is quantized (Q4_1 for `loftq_bits` 4, Q8_0 for 8; PEFT uses bitsandbytes' NF4 / int8 on a GPU) and A, B
/// are fitted to the quantization error by alternating `loftq_iter` times `Q = deq(quant(W − L R))`,
/// `L R = ` rank-r SVD of `W − Q` (`L = U √S`, `R = √S Vᵀ`); `A = R`, `B = L`, as PEFT sets them (unscaled, so
/// `Q + s·B A` approximates W when `s = 1`). PEFT then replaces the base weight by `Q`; Graft keeps W and subtracts
/// the frozen quantization error `(W − Q) x` in the layer, so the model is `Q x + s·B A x` while other adapters see
/// W; merging folds in `Q + s·B A − W`. On load the same Q is recomputed from the base weight (the quantizer is
/// deterministic), so a LoftQ adapter Graft saved reloads exactly; a PEFT LoftQ file expects PEFT's NF4 base and is
/// read against Graft's Q4_1 one instead (not the same function: no PEFT parity is claimed).
extension LoRALayer {
    func initializeLoftQ(base: Linear, options: LoftQOptions, path: String) throws {
        let outF = base.outFeatures, inF = base.inFeatures
        guard rank <= min(outF, inF) else {
            throw GraftError.invalid("\(path): rank \(rank) exceeds the layer's \(min(outF, inF)) singular values")
        }
        let weight = base.weight.detached()
        var target = weight
        var quantized = weight
        var low: (l: Tensor, r: Tensor) = (Tensor(zeros: [outF, rank]), Tensor(zeros: [rank, inF]))
        for iteration in 0..<options.iterations {
            quantized = try quantizeRoundTrip(target, format: options.format, what: path)
            let error = withNoGrad { weight - quantized }
            let (u, s, vt) = try svd(error, what: "the LoftQ quantization error of '\(path)'")
            let k = s.count
            let l = Tensor(zeros: [outF, rank]), r = Tensor(zeros: [rank, inF])
            for j in 0..<rank {
                let f = max(s.pointer[j], 0).squareRoot()
                for o in 0..<outF { l.pointer[o * rank + j] = u.pointer[o * k + j] * f }
                for c in 0..<inF { r.pointer[j * inF + c] = vt.pointer[j * inF + c] * f }
            }
            low = (l, r)
            if iteration + 1 < options.iterations { target = withNoGrad { weight - matmul(l, r) } }
        }
        loraA.pointer.update(from: low.r.pointer, count: loraA.count)
        loraB.pointer.update(from: low.l.pointer, count: loraB.count)
        quantizationError = withNoGrad { weight - quantized }
    }
}
