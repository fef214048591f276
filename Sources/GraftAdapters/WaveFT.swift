import Foundation
import GraftModels
import GraftTensor

/// WaveFT: `n` learned coefficients at fixed random positions of a wavelet spectrum (PyTorch's `randperm` from
/// `random_loc_seed`, ``TorchRandperm``), and ΔW its one-level inverse 2-D wavelet transform times `scaling`.
/// The transform is separable and each coefficient `(i, j)` synthesizes the outer product of two short filters,
/// so the forward runs per coefficient over the input (`2L` multiply-adds each for a length-`L` filter), never
/// forming ΔW. With `use_idwt: false` ΔW is the sparse spectrum itself. PEFT key `waveft_spectrum` `[n]`.
public final class WaveFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The learned coefficients `[n]`.
    public let spectrum: Tensor
    /// Per coefficient: the output rows and input columns it touches, with the filter weights (ΔW entries are
    /// `scaling · c · rowWeight · colWeight`).
    let rowTaps: [[(index: Int, weight: Float)]], colTaps: [[(index: Int, weight: Float)]]
    let scaling: Float
    let inFeatures: Int, outFeatures: Int

    init(base: Linear, frequencies: Int, scaling: Float, seed: UInt64, wavelet: [Double]?, initWeights: Bool,
         state: AdapterState) throws {
        let (inF, outF) = (base.inFeatures, base.outFeatures)
        guard frequencies > 0, frequencies <= inF * outF else {
            throw GraftError.invalid("n_frequency \(frequencies) must be in 1...\(inF * outF) (out_features × in_features)")
        }
        self.state = state
        inFeatures = inF
        outFeatures = outF
        self.scaling = scaling
        let flat = try TorchRandperm.prefix(frequencies, of: inF * outF, seed: seed)
        if let lo = wavelet {
            let len = lo.count
            let hi = (0..<len).map { i in (i % 2 == 0 ? 1.0 : -1.0) * lo[len - 1 - i] }
            // The spectrum is padded by the filter's reduction (len − 2) per dimension, to even sizes, centred.
            func plan(_ size: Int) -> (padded: Int, offset: Int, start: Int) {
                var padded = size + len - 2
                if padded % 2 != 0 { padded += 1 }
                let crop = (2 * len - 3) / 2
                let reconstructed = padded + len - 2 - 2 * crop
                return (padded, (padded - size) / 2, (reconstructed - size) / 2 + crop)
            }
            let rows = plan(outF), cols = plan(inF)
            // conv_transpose2d, stride 2: coefficient (p, q) of a quadrant adds f_row[a] f_col[b] at (2p + a, 2q + b).
            // The row filter follows the column quadrant (cA, cV: lo; cH, cD: hi), the column filter the row quadrant.
            func taps(_ pos: Int, plan: (padded: Int, offset: Int, start: Int), size: Int, filterFromOther: Bool) -> [(index: Int, weight: Float)] {
                let half = plan.padded / 2
                let filter = filterFromOther ? hi : lo
                let p = pos % half
                return (0..<len).compactMap { a in
                    let target = 2 * p + a - plan.start
                    return target >= 0 && target < size ? (target, Float(filter[a])) : nil
                }
            }
            var rt: [[(index: Int, weight: Float)]] = [], ct: [[(index: Int, weight: Float)]] = []
            for f in flat {
                let i = f / inF + rows.offset, j = f % inF + cols.offset
                let rowQuadrantIsLower = i >= rows.padded / 2, colQuadrantIsRight = j >= cols.padded / 2
                rt.append(taps(i, plan: rows, size: outF, filterFromOther: colQuadrantIsRight))
                ct.append(taps(j, plan: cols, size: inF, filterFromOther: rowQuadrantIsLower))
            }
            rowTaps = rt
            colTaps = ct
        } else {
            rowTaps = flat.map { [($0 / inF, 1)] }
            colTaps = flat.map { [($0 % inF, 1)] }
        }
        spectrum = (initWeights ? Tensor(zeros: [frequencies]) : Tensor.randomNormal([frequencies], std: 0.01, rng: &state.rng)).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("waveft_spectrum", spectrum)] }

    /// `x ΔWᵀ` for `x: [rows, in]`, recorded for autograd through `x` and the spectrum.
    func product(_ x: Tensor) -> Tensor {
        let rows = x.count / inFeatures
        let (inF, outF, n, s) = (inFeatures, outFeatures, spectrum.count, scaling)
        let (rowTaps, colTaps, spectrum) = (rowTaps, colTaps, spectrum)
        let out = Tensor(zeros: [rows, outF])
        let px = x.pointer, pc = spectrum.pointer, po = out.pointer
        parallelFor(rows, grain: 16) { range in
            for t in range {
                for k in 0..<n {
                    var z: Float = 0
                    for (j, w) in colTaps[k] { z += w * px[t * inF + j] }
                    let c = s * pc[k] * z
                    for (o, w) in rowTaps[k] { po[t * outF + o] += w * c }
                }
            }
        }
        return Tensor.recordingCustomOp(out, inputs: [x, spectrum]) { g in
            let pg = g.pointer, px = x.pointer, pc = spectrum.pointer
            let dx = x.requiresGrad ? Tensor(zeros: x.shape) : nil
            let dc = Tensor(zeros: spectrum.shape)
            let pdc = dc.pointer
            for t in 0..<rows {
                for k in 0..<n {
                    var u: Float = 0
                    for (o, w) in rowTaps[k] { u += w * pg[t * outF + o] }
                    guard u != 0 else { continue }
                    var z: Float = 0
                    for (j, w) in colTaps[k] { z += w * px[t * inF + j] }
                    pdc[k] += s * u * z
                    if let dx {
                        for (j, w) in colTaps[k] { dx.pointer[t * inF + j] += s * pc[k] * u * w }
                    }
                }
            }
            return [dx, spectrum.requiresGrad ? dc : nil]
        }
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        y + product(x.reshaped([-1, inFeatures])).reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        let delta = Tensor(zeros: [outFeatures, inFeatures])
        for k in 0..<spectrum.count {
            for (o, wo) in rowTaps[k] {
                for (j, wi) in colTaps[k] { delta.pointer[o * inFeatures + j] += scaling * spectrum.pointer[k] * wo * wi }
            }
        }
        return delta
    }
}

/// WaveFT (`peft_type: "WAVEFT"`): `n_frequency` (`n_frequency_pattern`), `scaling`, `wavelet_family` (`db1` /
/// `haar`; other families are rejected by name), `use_idwt`, `random_loc_seed`, `init_weights`.
public enum WaveFTFactory: AdapterMethodFactory {
    public static let peftType = "WAVEFT"
    public static let family = "weight-delta (sparse wavelet spectrum)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["n_frequency": 256, "target_modules": targets] }

    /// The reconstruction low-pass filters Graft carries (PyWavelets' values).
    static let lowPass: [String: [Double]] = ["db1": [0.7071067811865476, 0.7071067811865476], "haar": [0.7071067811865476, 0.7071067811865476]]

    public static func validate(_ config: AdapterConfig) throws {
        let family = try config.string("wavelet_family") ?? "db1"
        guard lowPass[family.lowercased()] != nil else {
            throw GraftError(.unsupported, "\(config.source): 'wavelet_family' = \"\(family)\" is not supported (Graft carries db1 / haar)")
        }
        if try config.bool("proportional_parameters", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'proportional_parameters' is not supported (set n_frequency or n_frequency_pattern)")
        }
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): 'bias' = \(bias) is not supported (only \"none\")")
        }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
        guard try config.int("random_loc_seed", default: 777) >= 0 else {
            throw GraftError.invalid("\(config.source): 'random_loc_seed' must be non-negative")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let count = try config.patternSize("n_frequency_pattern", path: path, default: try config.int("n_frequency", default: 2592))
        let family = (try config.string("wavelet_family") ?? "db1").lowercased()
        do {
            return try WaveFTLayer(base: layer, frequencies: count, scaling: Float(try config.double("scaling", default: 25)),
                                   seed: UInt64(try config.int("random_loc_seed", default: 777)),
                                   wavelet: try config.bool("use_idwt", default: true) ? lowPass[family] : nil,
                                   initWeights: try config.bool("init_weights", default: true), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
