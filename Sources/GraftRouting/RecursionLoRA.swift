import Foundation
import GraftModels
import GraftTensor

/// Which recursion of a Mixture-of-Recursions block is running (0 outside the block and in its first run).
final class RecursionState {
    var current = 0
}

/// A LoRA per recursion depth on one projection of a Mixture-of-Recursions shared block (the paper's relaxed
/// sharing): while recursion `r ≥ 1` runs, the projection adds `scale · B_r A_r x`; the first run (`r = 0`) and
/// every other use of the layer are unchanged, so depth 1 stays the model it was. `B_r` starts at zero.
public final class RecursionLoRA: Module, LinearAdapter {
    /// The adapted projection's path (`model.layers.N.self_attn.o_proj`).
    public let path: String
    /// Per recursion `1...N-1`, `A_r` `[rank, in]` (Kaiming-uniform as PEFT) and `B_r` `[out, rank]` (zeros).
    public let loraA: [Tensor], loraB: [Tensor]
    /// `alpha / rank`.
    public let scale: Float
    let state: RecursionState

    init(path: String, layer: Linear, recursions: Int, rank: Int, alpha: Float, state: RecursionState, rng: inout GraftRNG) {
        self.path = path
        let bound = 1 / Float(layer.inFeatures).squareRoot()
        loraA = (1..<recursions).map { _ in
            Tensor(shape: [rank, layer.inFeatures], values: (0..<(rank * layer.inFeatures)).map { _ in (rng.nextUniform() * 2 - 1) * bound })
        }
        loraB = (1..<recursions).map { _ in Tensor(zeros: [layer.outFeatures, rank]) }
        scale = alpha / Float(rank)
        self.state = state
        super.init(typeName: "RecursionLoRA")
        for (r, (a, b)) in zip(loraA, loraB).enumerated() {
            register(parameter: "\(r + 1).lora_A", a)
            register(parameter: "\(r + 1).lora_B", b)
        }
    }

    /// Active during recursions `1...N-1` only.
    public var isEnabled: Bool { state.current >= 1 && state.current <= loraA.count }

    /// The base output plus the running recursion's low-rank term.
    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let r = state.current
        guard r >= 1, r <= loraA.count else { return y }
        return y + linear(linear(x, loraA[r - 1]), loraB[r - 1]) * scale
    }
}

extension MixtureOfRecursions {
    /// The projections a recursion LoRA may target, by their names in a decoder layer.
    static func projection(_ name: String, of layer: LlamaDecoderLayer) -> Linear? {
        switch name {
        case "q_proj": return layer.qProj
        case "k_proj": return layer.kProj
        case "v_proj": return layer.vProj
        case "o_proj": return layer.oProj
        case "gate_proj": return layer.gateProj
        case "up_proj": return layer.upProj
        case "down_proj": return layer.downProj
        default: return nil
        }
    }

    /// Gives every recursion after the first its own LoRA (rank `rank`, `alpha`) on the block layers' `targets`
    /// of `model` (names as in a decoder layer: `o_proj`, `down_proj`, ...). Throws on an unknown target, a
    /// non-positive rank, or when the routing already has them.
    public func addRecursionLoRA(model: LlamaModel, rank: Int, alpha: Float, targets: [String] = ["o_proj", "down_proj"],
                                 seed: UInt64 = 0) throws {
        guard recursionAdapters.isEmpty else { throw GraftError(.state, "Mixture-of-Recursions: the routing already has recursion LoRAs") }
        guard (1...4096).contains(rank), alpha.isFinite else {
            throw GraftError.invalid("Mixture-of-Recursions: recursion LoRA rank \(rank) must be in 1...4096 and alpha finite")
        }
        guard blockEnd <= model.layers.count else {
            throw GraftError.invalid("Mixture-of-Recursions: the block ends at \(blockEnd), past the model's \(model.layers.count) layers")
        }
        var rng = GraftRNG(seed: seed)
        var made: [RecursionLoRA] = []
        for i in blockStart..<blockEnd {
            for name in targets {
                guard let linear = Self.projection(name, of: model.layers[i]) else {
                    throw GraftError.invalid("Mixture-of-Recursions: recursion LoRA target '\(name)' is not a decoder layer projection")
                }
                let path = "model.layers.\(i).\(["o_proj", "q_proj", "k_proj", "v_proj"].contains(name) ? "self_attn" : "mlp").\(name)"
                made.append(RecursionLoRA(path: path, layer: linear, recursions: maxRecursions, rank: rank, alpha: alpha,
                                          state: recursionState, rng: &rng))
            }
        }
        for (adapter, (i, name)) in zip(made, (blockStart..<blockEnd).flatMap { i in targets.map { (i, $0) } }) {
            Self.projection(name, of: model.layers[i])?.adapters.append(adapter)
        }
        recursionAdapters = made
        recursionLoRATargets = targets
        register("recursion_lora", ModuleList(made.enumerated().map { (String($0.offset), $0.element) }))
    }
}
