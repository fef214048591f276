import GraftModels
import GraftTensor

/// VB-LoRA (Li et al., 2024): LoRA whose A and B are assembled from a vector bank shared by every layer. Each
/// `len`-long piece of A (`[r, in/len]` pieces) and B (`[out/len, r]` pieces) is a top-k softmax admixture of
/// bank vectors, `Σₖ softmax(top-k logits)ₖ · bank[indexₖ]`; then `y = W x + b + B A x`. Keys:
/// `vblora_logits_A` `[r, in/len, n]`, `vblora_logits_B` `[out/len, r, n]`, shared `base_model.vblora_vector_bank`
/// `[n, len]` (trainable, shared by all layers).
public final class VBLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    public let logitsA: Tensor, logitsB: Tensor
    let bank: Tensor
    let rank: Int, topK: Int, vectorLength: Int, inFeatures: Int, outFeatures: Int

    init(base: Linear, rank: Int, topK: Int, bank: Tensor, logitsStd: Float, state: AdapterState) throws {
        let len = bank.shape[1], count = bank.shape[0]
        guard base.inFeatures % len == 0, base.outFeatures % len == 0 else {
            throw GraftError.invalid("vector_length \(len) must divide in_features \(base.inFeatures) and out_features \(base.outFeatures)")
        }
        guard topK >= 1, topK <= count else { throw GraftError.invalid("topk \(topK) must be in 1...num_vectors (\(count))") }
        self.state = state
        self.bank = bank
        self.rank = rank
        self.topK = topK
        vectorLength = len
        inFeatures = base.inFeatures
        outFeatures = base.outFeatures
        logitsA = Tensor.randomNormal([rank, base.inFeatures / len, count], std: logitsStd, rng: &state.rng).requiringGrad()
        logitsB = Tensor.randomNormal([base.outFeatures / len, rank, count], std: logitsStd, rng: &state.rng).requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { [("vblora_logits_A", logitsA), ("vblora_logits_B", logitsB)] }

    /// `[pieces, len]`: each row the top-k admixture of bank vectors for one row of `logits` (`[pieces, n]`).
    private func admix(_ logits: Tensor) -> Tensor {
        let n = bank.shape[0]
        let pieces = logits.count / n
        var flatIndex: [Int32] = [], bankIndex: [Int32] = []
        flatIndex.reserveCapacity(pieces * topK)
        for p in 0..<pieces {
            let row = logits.pointer + p * n
            // The k largest, ties to the lower index, in descending order (as torch.topk).
            var order = Array(0..<n)
            order.sort { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }
            for k in 0..<topK {
                flatIndex.append(Int32(p * n + order[k]))
                bankIndex.append(Int32(order[k]))
            }
        }
        let picked = embedding(flatIndex, table: logits.reshaped([logits.count, 1])).reshaped([pieces, topK])
        let weights = softmax(picked).reshaped([pieces, 1, topK])
        let vectors = embedding(bankIndex, table: bank).reshaped([pieces, topK, vectorLength])
        return matmul(weights, vectors).reshaped([pieces, vectorLength])
    }

    /// A `[r, in]` and B `[out, r]`, recorded.
    func matrices() -> (Tensor, Tensor) {
        let a = admix(logitsA).reshaped([rank, inFeatures])
        let b = admix(logitsB).reshaped([outFeatures / vectorLength, rank, vectorLength]).permuted([0, 2, 1]).reshaped([outFeatures, rank])
        return (a, b)
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let (a, b) = matrices()
        return y + linear(linear(x, a), b)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad {
            let (a, b) = matrices()
            return matmul(b, a)
        }
    }
}

/// VB-LoRA (`peft_type: "VBLORA"`): `r`, `num_vectors`, `vector_length`, `topk`, `init_logits_std`,
/// `init_vector_bank_bound`; `save_only_topk_weights` is not supported yet.
public enum VBLoRAFactory: AdapterMethodFactory {
    public static let peftType = "VBLORA"
    public static let family = "weight-delta (shared vector bank)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["r": 4, "num_vectors": 256, "vector_length": 64, "topk": 2, "target_modules": targets]
    }

    public static func validate(_ config: AdapterConfig) throws {
        if try config.bool("save_only_topk_weights", default: false) {
            throw GraftError(.unsupported, "\(config.source): VB-LoRA 'save_only_topk_weights' is not supported yet")
        }
        for key in ["r", "num_vectors", "vector_length", "topk"] where try config.int(key, default: 1) <= 0 {
            throw GraftError.invalid("\(config.source): '\(key)' must be positive")
        }
    }

    public static func sharedTensors(for layers: [Linear], config: AdapterConfig, state: AdapterState) throws -> [(key: String, tensor: Tensor)] {
        let n = try config.int("num_vectors", default: 256), len = try config.int("vector_length", default: 256)
        let bound = Float(try config.double("init_vector_bank_bound", default: 0.02))
        return [("base_model.vblora_vector_bank", Tensor.randomUniform([n, len], low: -bound, high: bound, rng: &state.rng).requiringGrad())]
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        guard let bank = shared["base_model.vblora_vector_bank"] else { throw GraftError(.internalError, "VB-LoRA bank missing") }
        do {
            return try VBLoRALayer(base: layer, rank: try config.int("r", default: 4), topK: try config.int("topk", default: 2),
                                   bank: bank, logitsStd: Float(try config.double("init_logits_std", default: 0.1)), state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
