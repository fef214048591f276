import GraftModels
import GraftTensor

/// One of GLoRA's five support tensors, as PEFT's `config_A_B` / `config_C` / `config_D_E` choose it.
enum GLoRAPath {
    /// `Xd Xu` (`Xd: [rows, r]`, `Xu: [r, cols]`), keys `<name>.Xd`, `<name>.Xu`.
    case lora(down: Tensor, up: Tensor)
    /// A column `[rows, 1]` or a vector `[rows]`, key `<name>.X`.
    case vector(Tensor)
    /// A scalar `[1]`, key `<name>.X`.
    case scalar(Tensor)
    /// Absent: PEFT keeps a zero buffer of this shape, saved as `<name>.zeros`.
    case empty([Int])

    /// Builds the path as PEFT does. `lora` is `[rows, cols]`; `vectorShape` is the shape of the vector form.
    static func make(_ kind: String, rows: Int, cols: Int, rank: Int, vectorShape: [Int], emptyShape: [Int],
                     initWeights: Bool, rng: inout GraftRNG) -> GLoRAPath {
        switch kind {
        case "lora":
            let up = kaimingUniform(rank, cols, rng: &rng).requiringGrad()
            let down = (initWeights ? Tensor(zeros: [rows, rank]) : kaimingUniform(rows, rank, rng: &rng)).requiringGrad()
            return .lora(down: down, up: up)
        case "vector":
            // PEFT's kaiming_uniform_ sees a [rows, 1] column (bound 1) or a [1, rows] row (bound 1/√rows).
            let bound: Float = vectorShape.count == 2 ? 1 : 1 / Float(max(rows, 1)).squareRoot()
            let t = initWeights ? Tensor(zeros: vectorShape) : Tensor.randomUniform(vectorShape, low: -bound, high: bound, rng: &rng)
            return .vector(t.requiringGrad())
        case "constant":
            let t = initWeights ? Tensor(zeros: [1]) : Tensor.randomNormal([1], std: 0.02, rng: &rng)
            return .scalar(t.requiringGrad())
        default:
            return .empty(emptyShape)
        }
    }

    /// The trainable tensors under their key suffixes.
    func parameters(_ name: String) -> [(name: String, tensor: Tensor)] {
        switch self {
        case .lora(let d, let u): return [("\(name).Xd", d), ("\(name).Xu", u)]
        case .vector(let t), .scalar(let t): return [("\(name).X", t)]
        case .empty: return []
        }
    }

    /// The zero buffer PEFT saves for an absent path.
    func buffers(_ name: String) -> [(name: String, tensor: Tensor)] {
        if case .empty(let shape) = self { return [("\(name).zeros", Tensor(zeros: shape))] }
        return []
    }

    /// The path as a dense tensor that broadcasts against `[rows, cols]` (nil when absent).
    func dense() -> Tensor? {
        switch self {
        case .lora(let d, let u): return matmul(d, u)
        case .vector(let t), .scalar(let t): return t
        case .empty: return nil
        }
    }
}

/// GLoRA (Chavan et al., 2023; seed paper #9): one generalized update of weight and bias,
/// `W' = W + W ∘ A + B`, `b' = b + b ∘ D + E + W C`, each support tensor low-rank, a vector, a scalar or absent
/// (`config_A_B`, `config_C`, `config_D_E`). The forward runs `(W ∘ A) x` through ``hadamardLowRank(_:weight:down:up:)``
/// and `B x` as two thin products, never forming `A` or `B`. C, D and E exist only on layers with a bias (PEFT).
/// PEFT keys `glora_A.Xd`, `glora_A.Xu`, …, `glora_D.X`, `glora_E.X` (`.zeros` buffers for absent paths).
public final class GLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    let pathA: GLoRAPath, pathB: GLoRAPath, pathC: GLoRAPath, pathD: GLoRAPath, pathE: GLoRAPath
    let inFeatures: Int, outFeatures: Int

    init(base: Linear, rank: Int, configAB: String, configC: String, configDE: String, initWeights: Bool, state: AdapterState) {
        self.state = state
        let (inF, outF) = (base.inFeatures, base.outFeatures)
        inFeatures = inF
        outFeatures = outF
        let hasBias = base.bias != nil
        pathA = .make(configAB, rows: outF, cols: inF, rank: rank, vectorShape: [outF, 1], emptyShape: [outF, inF], initWeights: initWeights, rng: &state.rng)
        pathB = .make(configAB, rows: outF, cols: inF, rank: rank, vectorShape: [outF, 1], emptyShape: [outF, inF], initWeights: initWeights, rng: &state.rng)
        pathC = .make(hasBias ? configC : "none", rows: inF, cols: 1, rank: rank, vectorShape: [inF, 1], emptyShape: [inF, 1], initWeights: initWeights, rng: &state.rng)
        let de = hasBias && configDE != "lora" ? configDE : "none"
        pathD = .make(de, rows: outF, cols: 1, rank: rank, vectorShape: [outF], emptyShape: [outF], initWeights: initWeights, rng: &state.rng)
        pathE = .make(de, rows: outF, cols: 1, rank: rank, vectorShape: [outF], emptyShape: [outF], initWeights: initWeights, rng: &state.rng)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        pathA.parameters("glora_A") + pathB.parameters("glora_B") + pathC.parameters("glora_C")
            + pathD.parameters("glora_D") + pathE.parameters("glora_E")
    }

    public var savedBuffers: [(name: String, tensor: Tensor)] {
        pathA.buffers("glora_A") + pathB.buffers("glora_B") + pathC.buffers("glora_C") + pathD.buffers("glora_D") + pathE.buffers("glora_E")
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let x2 = x.reshaped([-1, inFeatures])
        var out = y.reshaped([-1, outFeatures])
        switch pathA {
        case .lora(let d, let u): out = out + hadamardLowRank(x2, weight: layer.weight, down: d, up: u)
        case .vector(let t): out = out + linear(x2, layer.weight) * t.reshaped([1, outFeatures])
        case .scalar(let t): out = out + linear(x2, layer.weight) * t
        case .empty: break
        }
        switch pathB {
        case .lora(let d, let u): out = out + linear(linear(x2, u), d)
        case .vector(let t), .scalar(let t):
            // B broadcasts along the input: (B x)ₒ = Bₒ Σᵢ xᵢ.
            // The outer product (row sums) ⊗ B as a product: elementwise broadcasting would stretch both sides.
            let rowSums = matmul(x2, Tensor(repeating: 1, shape: [inFeatures, 1]))
            out = out + (t.count == 1 ? rowSums * t : matmul(rowSums, t.reshaped([1, t.count])))
        case .empty: break
        }
        if let bias = layer.bias, let db = biasDelta(weight: layer.weight, bias: bias) {
            out = out + db.reshaped([1, outFeatures])
        }
        return out.reshaped(y.shape)
    }

    /// `b ∘ D + E + W C` `[out]` (nil when every bias path is absent), recorded for autograd.
    func biasDelta(weight: Tensor, bias: Tensor) -> Tensor? {
        var terms: [Tensor] = []
        if let d = pathD.dense() { terms.append(bias * d) }
        if let e = pathE.dense() { terms.append(e + Tensor(zeros: [outFeatures])) }
        if let c = pathC.dense() { terms.append(matmul(weight, c).reshaped([outFeatures])) }
        guard var total = terms.first else { return nil }
        for t in terms.dropFirst() { total = total + t }
        return total
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            var delta = Tensor(zeros: [outFeatures, inFeatures])
            if let a = pathA.dense() { delta = delta + base.weight * a }
            if let b = pathB.dense() { delta = delta + b }
            return delta
        }
    }

    public func deltaBias(base: Linear) -> Tensor? {
        guard let bias = base.bias else { return nil }
        return withNoGrad { biasDelta(weight: base.weight, bias: bias) }
    }
}

/// GLoRA (`peft_type: "GLORA"`): `r`, `config_A_B` (`lora`, `vector`, `constant`, `none`), `config_C` (`lora`,
/// `vector`, `none`), `config_D_E` (`vector`, `constant`, `none`), `init_weights`.
public enum GLoRAFactory: AdapterMethodFactory {
    public static let peftType = "GLORA"
    public static let family = "weight-delta (generalized: scale, shift, bias)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 4, "target_modules": targets] }

    static func choice(_ config: AdapterConfig, _ key: String, default value: String, allowed: [String]) throws -> String {
        let v = try config.string(key) ?? value
        guard allowed.contains(v) else {
            throw GraftError.invalid("\(config.source): '\(key)' must be one of \(allowed.joined(separator: ", ")), got \"\(v)\"")
        }
        return v
    }

    public static func validate(_ config: AdapterConfig) throws {
        let r = try config.int("r", default: 4)
        guard r > 0 else { throw GraftError.invalid("\(config.source): 'r' must be positive, got \(r)") }
        if let bias = try config.string("bias"), bias != "none" {
            throw GraftError(.unsupported, "\(config.source): 'bias' = \(bias) is not supported (only \"none\")")
        }
        _ = try choice(config, "config_A_B", default: "lora", allowed: ["lora", "vector", "constant", "none"])
        _ = try choice(config, "config_C", default: "lora", allowed: ["lora", "vector", "none"])
        _ = try choice(config, "config_D_E", default: "constant", allowed: ["vector", "constant", "none"])
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        GLoRALayer(base: layer, rank: try config.int("r", default: 4),
                   configAB: try choice(config, "config_A_B", default: "lora", allowed: ["lora", "vector", "constant", "none"]),
                   configC: try choice(config, "config_C", default: "lora", allowed: ["lora", "vector", "none"]),
                   configDE: try choice(config, "config_D_E", default: "constant", allowed: ["vector", "constant", "none"]),
                   initWeights: try config.bool("init_weights", default: true), state: state)
    }
}
