import Foundation
import GraftModels
import GraftTensor

/// FourierFT (Gao et al., 2024): ΔW is the real part of the inverse 2-D DFT of a sparse spectrum with `n`
/// learned coefficients `c` at fixed random frequencies `(u, v)`,
/// `ΔW[p, q] = scaling/(out·in) · Σₖ cₖ cos(2π(p uₖ/out + q vₖ/in))`. Splitting the cosine,
/// `ΔW = α (C_out diag(c) C_inᵀ − S_out diag(c) S_inᵀ)`, so the update runs as two rank-`n` products without
/// forming ΔW; where `n` is large against the widths (the bench's 6,000 of 384 × 384) ΔW is formed instead as the
/// 2-D transform of the sparse spectrum, four dense products with the full DFT bases, whichever costs less. The frequencies are the first `n` entries of PyTorch's CPU `randperm(out·in)` seeded with
/// `random_loc_seed`, reproduced by ``TorchRandperm``; PEFT does not save them. PEFT key `fourierft_spectrum` `[n]`.
public final class FourierFTLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The learned spectral coefficients `[n]`.
    public let spectrum: Tensor
    /// Row (output) and column (input) frequency of each coefficient.
    let rowFrequency: [Int], columnFrequency: [Int]
    let inFeatures: Int, outFeatures: Int
    /// `scaling / (out · in)`, the inverse DFT's normalization folded in.
    let alpha: Float
    /// cos and sin of `2π j / out` and `2π j / in`.
    let cosOut: [Float], sinOut: [Float], cosIn: [Float], sinIn: [Float]

    init(base: Linear, frequencies: Int, scaling: Float, seed: UInt64, initWeights: Bool, state: AdapterState) throws {
        let total = base.outFeatures * base.inFeatures
        guard frequencies > 0, frequencies <= total else {
            throw GraftError.invalid("n_frequency \(frequencies) must be in 1...\(total) (out_features × in_features)")
        }
        self.state = state
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        alpha = scaling / Float(total)
        let flat = try TorchRandperm.prefix(frequencies, of: total, seed: seed)
        rowFrequency = flat.map { $0 / base.inFeatures }
        columnFrequency = flat.map { $0 % base.inFeatures }
        func table(_ n: Int, _ f: (Double) -> Double) -> [Float] { (0..<n).map { Float(f(2 * Double.pi * Double($0) / Double(n))) } }
        cosOut = table(outFeatures) { cos($0) }
        sinOut = table(outFeatures) { sin($0) }
        cosIn = table(inFeatures) { cos($0) }
        sinIn = table(inFeatures) { sin($0) }
        spectrum = (initWeights ? Tensor(zeros: [frequencies]) : Tensor.randomNormal([frequencies], rng: &state.rng)).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("fourierft_spectrum", spectrum)] }

    /// `[size, n]` with entry `(p, k)` = `f(2π · (p·freqₖ mod size) / size)`, from the lookup table.
    private func basis(_ size: Int, _ freq: [Int], _ lookup: [Float]) -> Tensor {
        let n = freq.count
        let out = Tensor(zeros: [size, n])
        let po = out.pointer
        for p in 0..<size {
            for k in 0..<n { po[p * n + k] = lookup[(p * freq[k]) % size] }
        }
        return out
    }

    /// `[size, size]` with entry `(p, u)` = `f(2π · (p·u mod size) / size)`: the full DFT basis.
    private func fullBasis(_ size: Int, _ lookup: [Float]) -> Tensor {
        let out = Tensor(zeros: [size, size])
        let po = out.pointer
        for p in 0..<size {
            for u in 0..<size { po[p * size + u] = lookup[(p * u) % size] }
        }
        return out
    }

    /// Whether ΔW is cheaper formed as the 2-D transform of the sparse spectrum (`C_out S C_inᵀ − S_out S S_inᵀ`,
    /// `S` the `[out, in]` spectrum, four dense products of `out²·in` or `out·in²` multiply-adds) than as the
    /// rank-`n` products with `rows` input rows (or, for `rows` nil, the rank-`n` ΔW itself).
    func transformIsCheaper(rows: Int?) -> Bool {
        let o = Double(outFeatures), i = Double(inFeatures), n = Double(spectrum.count)
        let transform = 2 * (o * o * i + o * i * i) + (rows.map { Double($0) * o * i } ?? 0)
        let rankN = rows.map { 2 * Double($0) * n * (i + o) } ?? 2 * o * i * n
        return transform < rankN
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let x2 = x.reshaped([-1, inFeatures])
        if transformIsCheaper(rows: x2.rows) {
            return y + matmul(x2, delta(), transposeB: true).reshaped(y.shape)
        }
        let c = spectrum.reshaped([1, spectrum.count]) * alpha
        let realPart = matmul(matmul(x2, basis(inFeatures, columnFrequency, cosIn)) * c, basis(outFeatures, rowFrequency, cosOut), transposeB: true)
        let imagPart = matmul(matmul(x2, basis(inFeatures, columnFrequency, sinIn)) * c, basis(outFeatures, rowFrequency, sinOut), transposeB: true)
        return y + (realPart - imagPart).reshaped(y.shape)
    }

    /// ΔW `[out, in]`, by whichever form costs less (both recorded for autograd through the spectrum).
    func delta() -> Tensor {
        if transformIsCheaper(rows: nil) {
            let sparse = denseFromSparse(spectrum * alpha, rowIndex: rowFrequency.map(Int32.init),
                                         colIndex: columnFrequency.map(Int32.init), rows: outFeatures, cols: inFeatures)
            let realPart = matmul(matmul(fullBasis(outFeatures, cosOut), sparse), fullBasis(inFeatures, cosIn), transposeB: true)
            let imagPart = matmul(matmul(fullBasis(outFeatures, sinOut), sparse), fullBasis(inFeatures, sinIn), transposeB: true)
            return realPart - imagPart
        }
        let c = spectrum.reshaped([1, spectrum.count]) * alpha
        let realPart = matmul(basis(outFeatures, rowFrequency, cosOut) * c, basis(inFeatures, columnFrequency, cosIn), transposeB: true)
        let imagPart = matmul(basis(outFeatures, rowFrequency, sinOut) * c, basis(inFeatures, columnFrequency, sinIn), transposeB: true)
        return realPart - imagPart
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { delta() } }
}

/// PyTorch's CPU `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`, re-implemented for the
/// sizes PEFT uses: the generator is MT19937 seeded by `init_genrand(seed mod 2³²)`, and for
/// `n < (2³² − 1) / 20` randperm is a forward Fisher–Yates shuffle drawing `j = i + u32 mod (n − i)` for
/// `i = 0, 1, …`. Position `i` is final after step `i`, so the first `k` entries need only `k` draws.
public enum TorchRandperm {
    /// The first `k` entries of the permutation of `0..<n`.
    public static func prefix(_ k: Int, of n: Int, seed: UInt64) throws -> [Int] {
        guard n < Int(UInt32.max / 20) else {
            throw GraftError(.unsupported, "randperm of \(n) elements uses PyTorch's 64-bit path, which Graft does not reproduce (limit \(UInt32.max / 20))")
        }
        var mt = MT19937(seed: UInt32(truncatingIfNeeded: seed))
        var moved: [Int: Int] = [:]  // position → value, for positions the shuffle has touched
        var out: [Int] = []
        out.reserveCapacity(k)
        for i in 0..<min(k, max(n - 1, 0)) {
            let j = i + Int(mt.next() % UInt32(n - i))
            let vi = moved[i] ?? i, vj = moved[j] ?? j
            moved[j] = vi
            out.append(vj)
        }
        if out.count < k { out.append(moved[n - 1] ?? (n - 1)) }
        return out
    }

    /// The 32-bit Mersenne Twister (Matsumoto & Nishimura), as PyTorch's CPU generator.
    struct MT19937 {
        private var mt = [UInt32](repeating: 0, count: 624)
        private var index = 624

        init(seed: UInt32) {
            mt[0] = seed
            for i in 1..<624 { mt[i] = 1_812_433_253 &* (mt[i - 1] ^ (mt[i - 1] >> 30)) &+ UInt32(i) }
        }

        mutating func next() -> UInt32 {
            if index >= 624 { twist() }
            var y = mt[index]
            index += 1
            y ^= y >> 11
            y ^= (y << 7) & 0x9D2C_5680
            y ^= (y << 15) & 0xEFC6_0000
            y ^= y >> 18
            return y
        }

        private mutating func twist() {
            for i in 0..<624 {
                let y = (mt[i] & 0x8000_0000) | (mt[(i + 1) % 624] & 0x7FFF_FFFF)
                mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1) != 0 ? 0x9908_B0DF : 0)
            }
            index = 0
        }
    }
}

/// FourierFT (`peft_type: "FOURIERFT"`): `n_frequency` (with `n_frequency_pattern`), `scaling`, `random_loc_seed`,
/// `init_weights` (PEFT's default false draws the spectrum from N(0, 1)).
public enum FourierFTFactory: AdapterMethodFactory {
    public static let peftType = "FOURIERFT"
    public static let family = "weight-delta (sparse spectrum)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["n_frequency": 1000, "scaling": 150.0, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): bias '\(bias)' is not supported (only \"none\")")
        }
        if try config.bool("fan_in_fan_out", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'fan_in_fan_out' is for Conv1D models; Graft's layers are Linear")
        }
        if config.value("random_loc_seed") is NSNull {
            throw GraftError(.unsupported, "\(config.source): 'random_loc_seed' must be an integer (the frequencies are drawn from it)")
        }
        let seed = try config.int("random_loc_seed", default: 777)
        guard seed >= 0 else { throw GraftError.invalid("\(config.source): 'random_loc_seed' must be non-negative, got \(seed)") }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let defaultCount = try config.int("n_frequency", default: 1000)
        let count = try config.patternSize("n_frequency_pattern", path: path, default: defaultCount)
        do {
            return try FourierFTLayer(base: layer, frequencies: count, scaling: Float(try config.double("scaling", default: 150)),
                                      seed: UInt64(try config.int("random_loc_seed", default: 777)),
                                      initWeights: try config.bool("init_weights", default: false), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
