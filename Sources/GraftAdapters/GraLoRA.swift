import GraftModels
import GraftTensor

/// GraLoRA (granular LoRA): the weight is split into `k × k` blocks and each block `(j, n)` gets its own rank-`r/k`
/// update `A_n[:, j-th r/k columns] · B_j[n-th r/k rows]`, built from `k` input-side factors `A: [k, in/k, r]` and `k`
/// output-side factors `B: [k, r, out/k]` that exchange their rank slices; optionally plus a plain LoRA of rank
/// `hybrid_r`. Scaled by `alpha / (r + hybrid_r)`. The forward is two batched products (no ΔW). PEFT keys
/// `gralora_A` `[k, in/k, r]`, `gralora_B` `[k, r, out/k]`, `gralora_A_general.weight`, `gralora_B_general.weight`.
public final class GraLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `[k, in/k, r]`.
    public let a: Tensor
    /// `[k, r, out/k]` (zero at PEFT's default initialization).
    public let b: Tensor
    /// Hybrid LoRA `[hybrid_r, in]` and `[out, hybrid_r]`, when `hybrid_r > 0`.
    public let generalA: Tensor?, generalB: Tensor?
    let k: Int, rank: Int, inFeatures: Int, outFeatures: Int
    let scaling: Float
    let dropoutProbability: Float

    init(base: Linear, rank: Int, hybridRank: Int, blocks: Int, alpha: Float, initWeights: Bool, dropout: Float,
         state: AdapterState) throws {
        let (inF, outF) = (base.inFeatures, base.outFeatures)
        guard inF % blocks == 0, outF % blocks == 0 else {
            throw GraftError.invalid("in_features \(inF) and out_features \(outF) must be divisible by gralora_k \(blocks)")
        }
        guard rank % blocks == 0 else { throw GraftError.invalid("r \(rank) must be divisible by gralora_k \(blocks)") }
        self.state = state
        k = blocks
        self.rank = rank
        inFeatures = inF
        outFeatures = outF
        scaling = alpha / Float(rank + hybridRank)
        dropoutProbability = dropout
        // PEFT draws each block's A as [r, in/k] (Kaiming, fan-in in/k) and stores it transposed.
        var blocksA: [Float] = [], blocksB: [Float] = []
        for _ in 0..<blocks {
            blocksA += kaimingUniform(rank, inF / blocks, rng: &state.rng).transposed(0, 1).scalars
            blocksB += initWeights ? [Float](repeating: 0, count: rank * outF / blocks)
                : kaimingUniform(outF / blocks, rank, rng: &state.rng).transposed(0, 1).scalars
        }
        a = Tensor(shape: [blocks, inF / blocks, rank], values: blocksA).requiringGrad()
        b = Tensor(shape: [blocks, rank, outF / blocks], values: blocksB).requiringGrad()
        if hybridRank > 0 {
            generalA = kaimingUniform(hybridRank, inF, rng: &state.rng).requiringGrad()
            generalB = (initWeights ? Tensor(zeros: [outF, hybridRank]) : kaimingUniform(outF, hybridRank, rng: &state.rng)).requiringGrad()
        } else {
            generalA = nil
            generalB = nil
        }
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        var out: [(name: String, tensor: Tensor)] = [("gralora_A", a), ("gralora_B", b)]
        if let ga = generalA, let gb = generalB { out += [("gralora_A_general.weight", ga), ("gralora_B_general.weight", gb)] }
        return out
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let xd = dropout(x, p: dropoutProbability, state: state).reshaped([-1, inFeatures])
        let t = xd.shape[0], sub = rank / k
        // [k, T, in/k] · A_n → [k(n), T, r] with r = (j, s); regroup to [k(j), T, (n, s)] and apply B_j.
        let h = matmul(xd.reshaped([t, k, inFeatures / k]).permuted([1, 0, 2]), a)
        let exchanged = h.reshaped([k, t, k, sub]).permuted([2, 1, 0, 3]).reshaped([k, t, rank])
        let out = matmul(exchanged, b).permuted([1, 0, 2]).reshaped([t, outFeatures])
        var delta = out * scaling
        if let ga = generalA, let gb = generalB { delta = delta + linear(linear(xd, ga), gb) * scaling }
        return y + delta.reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        let sub = rank / k, inB = inFeatures / k, outB = outFeatures / k
        let delta = Tensor(zeros: [outFeatures, inFeatures])
        // Block (j, n) = (A_n[:, j-slice] · B_j[n-slice, :])ᵀ, written straight into ΔW.
        for j in 0..<k {
            for n in 0..<k {
                sgemm(transA: true, transB: true, m: outB, n: inB, k: sub, alpha: scaling,
                      a: b.pointer + j * rank * outB + n * sub * outB, lda: outB,
                      b: a.pointer + n * inB * rank + j * sub, ldb: rank,
                      c: delta.pointer + j * outB * inFeatures + n * inB, ldc: inFeatures)
            }
        }
        guard let ga = generalA, let gb = generalB else { return delta }
        return withNoGrad { delta + matmul(gb, ga) * scaling }
    }
}

/// GraLoRA (`peft_type: "GRALORA"`): `r`, `alpha`, `gralora_k`, `hybrid_r`, `gralora_dropout`, `init_weights`.
public enum GraLoRAFactory: AdapterMethodFactory {
    public static let peftType = "GRALORA"
    public static let family = "weight-delta (block-granular low rank)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "alpha": 16, "gralora_k": 2, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 32), k = try config.int("gralora_k", default: 2)
        let hybrid = try config.int("hybrid_r", default: 0)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        guard k > 0 else { throw GraftError.invalid("\(config.source): 'gralora_k' must be positive, got \(k)") }
        guard r % k == 0 else { throw GraftError.invalid("\(config.source): 'r' (\(r)) must be divisible by 'gralora_k' (\(k))") }
        guard hybrid >= 0 else { throw GraftError.invalid("\(config.source): 'hybrid_r' must be non-negative, got \(hybrid)") }
        try validateDropoutBiasAndLayout(config, dropoutKey: "gralora_dropout")
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        do {
            return try GraLoRALayer(base: layer, rank: try config.int("r", default: 32), hybridRank: try config.int("hybrid_r", default: 0),
                                    blocks: try config.int("gralora_k", default: 2), alpha: Float(try config.double("alpha", default: 64)),
                                    initWeights: try config.bool("init_weights", default: true),
                                    dropout: Float(try config.double("gralora_dropout", default: 0)), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
