import GraftModels
import GraftTensor

/// Trainable tokens (PEFT): new values for selected rows of an embedding table, trained while the rest stays
/// frozen. PEFT key `trainable_tokens_delta` `[tokens, dim]` (the replacement rows, in `token_indices` order).
public final class TrainableTokensLayer: ModuleAdapterMethod, EmbeddingAdapter {
    public let state: AdapterState
    /// The replacement rows.
    public let rows: Tensor
    /// The token ids whose rows are replaced.
    public let tokenIndices: [Int32]
    let table: Embedding
    let slot: [Int32: Int32]
    /// The key prefix when these rows belong to a LoRA adapter's `trainable_token_indices`
    /// (`base_model.model.<path>.token_adapter.`); nil for a `TRAINABLE_TOKENS` adapter.
    public let keyPrefix: String?

    init(table: Embedding, tokenIndices: [Int32], state: AdapterState, keyPrefix: String? = nil) throws {
        if let bad = tokenIndices.first(where: { $0 < 0 || Int($0) >= table.count }) {
            throw GraftError.invalid("token index \(bad) is outside the embedding's 0..<\(table.count)")
        }
        self.state = state
        self.table = table
        self.tokenIndices = tokenIndices
        self.keyPrefix = keyPrefix
        rows = table.baseRows(tokenIndices).detached().copy().requiringGrad()
        slot = Dictionary(tokenIndices.enumerated().map { ($0.element, Int32($0.offset)) }, uniquingKeysWith: { a, _ in a })
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var namedParameters: [(name: String, tensor: Tensor)] { [("trainable_tokens_delta", rows)] }
    public func attach() { table.adapters.append(self) }
    public func detach() { table.adapters.removeAll { $0 === self } }

    public func forward(ids: [Int32], baseOutput y: Tensor, layer: Embedding) -> Tensor {
        // Rows of selected tokens come from `rows` (index k), the others from the base (index → a zero row).
        let zeroSlot = Int32(tokenIndices.count)
        let picks = ids.map { slot[$0] ?? zeroSlot }
        let keep = Tensor(shape: [ids.count, 1], values: ids.map { slot[$0] == nil ? 1 : 0 })
        let replacement = embedding(picks, table: concat([rows, Tensor(zeros: [1, layer.dim])], dim: 0))
        return y * keep + replacement
    }

    public func merge() -> [Tensor] {
        // A quantized table becomes float32 (with a tied head) so the rows can be written exactly.
        table.makeWeightDense()
        let saved = [table.weight.copy()]
        for (k, id) in tokenIndices.enumerated() {
            (table.weight.pointer + Int(id) * table.dim).update(from: rows.pointer + k * table.dim, count: table.dim)
        }
        return saved
    }

    public func unmerge(_ saved: [Tensor]) {
        if let w = saved.first { table.weight.pointer.update(from: w.pointer, count: w.count) }
    }

    public func load(_ name: String, from tensor: Tensor) throws {
        guard name == "trainable_tokens_delta" else { throw GraftError.format("unknown trainable-tokens tensor '\(name)'") }
        guard rows.shape == tensor.shape else {
            throw GraftError.format("'trainable_tokens_delta' has shape \(tensor.shape), expected \(rows.shape) for token_indices \(tokenIndices)")
        }
        rows.pointer.update(from: tensor.pointer, count: rows.count)
    }
}

/// Trainable tokens (`peft_type: "TRAINABLE_TOKENS"`): `target_modules` (the embedding), `token_indices`.
public enum TrainableTokensFactory: ModuleAdapterFactory {
    public static let peftType = "TRAINABLE_TOKENS"
    public static let family = "selective (embedding rows)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["target_modules": ["word_embeddings", "embed_tokens"], "token_indices": [0, 1, 2]] }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        guard let table = module as? Embedding else { return nil }
        guard let indices = config.value("token_indices") as? [Int], !indices.isEmpty else {
            throw GraftError.invalid("\(config.source): 'token_indices' must be a non-empty list of token ids")
        }
        do {
            return try TrainableTokensLayer(table: table, tokenIndices: indices.map { Int32(clamping: $0) }, state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
