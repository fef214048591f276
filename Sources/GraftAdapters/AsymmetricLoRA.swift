import GraftIO
import GraftModels
import GraftTensor

/// Asymmetric LoRA (Zhu et al., 2024, "Asymmetry in Low-Rank Adapters of Foundation Models"):
/// `y = W x + s·B A x` with `A: [r, in]` random with orthonormal rows and frozen, and only `B: [out, r]`
/// (zero-initialized) trained; `s = α/r` (`α/√r` with rsLoRA).
///
/// Config: `peft_type: "ASYMMETRIC_LORA"` with LoRA's keys, or equivalently `"LORA"` with `train_a: false`.
/// The math and tensor keys are LoRA's (`lora_A.weight` saved as a frozen buffer and restored on load,
/// `lora_B.weight` trained), and the adapter is saved as `peft_type: "LORA"` with `train_a: false`, which
/// PEFT's LoRA loader reads (it ignores the unknown key) and Graft loads back as this method.
public final class AsymmetricLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// Frozen `[r, in]` with orthonormal rows.
    public let loraA: Tensor
    /// Trainable `[out, r]`, zero at creation.
    public let loraB: Tensor
    /// `α/r` (or `α/√r`).
    public let scaling: Float
    let dropoutProbability: Float

    /// Draws A as the Gram–Schmidt orthonormalization (in Float64) of a Gaussian `[r, in]`; throws if `r > in`.
    public init(base: Linear, rank: Int, alpha: Float, useRSLoRA: Bool, dropout: Float, state: AdapterState, path: String) throws {
        let inF = base.inFeatures
        guard rank <= inF else {
            throw GraftError.invalid("\(path): asymmetric LoRA rank \(rank) exceeds the input width \(inF) (A needs orthonormal rows)")
        }
        self.state = state
        scaling = useRSLoRA ? alpha / Float(rank).squareRoot() : alpha / Float(rank)
        dropoutProbability = dropout
        var rows: [[Double]] = []
        while rows.count < rank {
            var v = (0..<inF).map { _ in Double(state.rng.nextNormal()) }
            for q in rows {
                let d = zip(v, q).reduce(0) { $0 + $1.0 * $1.1 }
                for i in 0..<inF { v[i] -= d * q[i] }
            }
            let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
            guard norm > 1e-6 else { continue }  // a degenerate draw: try again
            rows.append(v.map { $0 / norm })
        }
        loraA = Tensor(shape: [rank, inF], values: rows.flatMap { $0.map { Float($0) } })
        loraB = Tensor(zeros: [base.outFeatures, rank]).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("lora_B.weight", loraB)] }

    public var savedBuffers: [(name: String, tensor: Tensor)] { [("lora_A.weight", loraA)] }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {
        guard name == "lora_A.weight" else { throw GraftError.format("unknown asymmetric LoRA buffer '\(name)'") }
        try copyParameter(name, into: loraA, from: tensor)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let h = linear(dropout(x, p: dropoutProbability, state: state), loraA)
        return y + linear(h, loraB) * scaling
    }

    public func deltaWeight(base: Linear) -> Tensor? { withNoGrad { matmul(loraB, loraA) * scaling } }
}

/// Asymmetric LoRA (`peft_type: "ASYMMETRIC_LORA"`): LoRA's `r`, `lora_alpha`, `lora_dropout`, `use_rslora`,
/// `rank_pattern`, `alpha_pattern`. Also built for `"LORA"` configs with `train_a: false`.
public enum AsymmetricLoRAFactory: AdapterMethodFactory {
    public static let peftType = "ASYMMETRIC_LORA"
    public static let family = "weight-delta (low rank, frozen random A)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "lora_alpha": 16, "target_modules": targets] }

    public static func validate(_ config: AdapterConfig) throws {
        try LoRAFactory.validateCommon(config)
        if try config.bool("use_dora", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'use_dora' cannot be combined with a frozen A (asymmetric LoRA)")
        }
        switch config.value("init_lora_weights") {
        case nil: break
        case let b? where JSONScalar.bool(b) == true: break
        case let other?: throw GraftError(.unsupported, "\(config.source): asymmetric LoRA takes no init_lora_weights \(other) (A is random orthonormal, B zero)")
        }
        if let flag = config.value("train_a"), !JSONScalar.isBool(flag) {
            throw GraftError.invalid("\(config.source): 'train_a' must be a boolean, got \(flag)")
        }
        if config.peftType == peftType, try config.bool("train_a", default: false) {
            throw GraftError.invalid("\(config.source): ASYMMETRIC_LORA trains B only; 'train_a: true' is plain LORA")
        }
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        let (r, alpha) = try rankAndAlpha(config, path: path, alphaKey: "lora_alpha")
        return try AsymmetricLoRALayer(base: layer, rank: r, alpha: alpha, useRSLoRA: try config.bool("use_rslora", default: false),
                                       dropout: Float(try config.double("lora_dropout", default: 0)), state: state,
                                       path: "\(config.source): \(path)")
    }

    /// The config written on save: `peft_type: "LORA"` with `train_a: false`, so PEFT's LoRA loader reads it.
    static func savedConfig(_ config: AdapterConfig) throws -> AdapterConfig {
        var json = config.json
        json["peft_type"] = LoRAFactory.peftType
        json["train_a"] = false
        return try AdapterConfig(json: json, source: config.source)
    }
}
