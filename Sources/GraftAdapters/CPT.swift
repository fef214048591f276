import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Context-aware prompt tuning (Blau et al., 2024), PEFT's `CPTEmbedding`: the virtual tokens are the embeddings
/// `E` of the in-context examples' tokens (`cpt_token_ids`, frozen) plus a trained change `δ` (`[n, d]`, zero at
/// first) that is projected back into a ball after every update: row `i` is scaled to norm at most `ε_i`, where
/// `ε_i = opt_projection_format_epsilon · √(d / 2048)` for template tokens (`cpt_tokens_type_mask` ≡ 1 or 3 mod 4),
/// `opt_projection_epsilon · √(d / 2048)` for input tokens (≡ 2) and 1e-10 otherwise. Only template and input rows
/// train (PEFT masks the others' gradients). The virtual tokens precede every sequence as in prompt tuning, and
/// PEFT's output keeps them. PEFT saves `E + δ` as `prompt_embeddings`; loading it sets `E` and a zero `δ`.
public final class CPTLayer: PromptAdapter, ModuleAdapterMethod {
    public let state: AdapterState
    let model: LlamaModel
    /// `E`, `[n, d]`, frozen.
    public let embedding: Tensor
    /// `δ`, `[n, d]`, trained.
    public let delta: Tensor
    /// 1 for rows that train (type ≡ 1, 2, 3 mod 4), else 0, `[n, 1]`.
    let trainMask: Tensor
    /// Each row's projection radius.
    let epsilon: [Float]

    init(model: LlamaModel, tokenIDs: [Int], types: [Int], inputEpsilon: Double, formatEpsilon: Double,
         initializeFromVocabulary: Bool, state: AdapterState) {
        self.state = state
        self.model = model
        let n = tokenIDs.count, d = model.config.hiddenSize
        embedding = initializeFromVocabulary ? withNoGrad { GraftTensor.embedding(tokenIDs.map(Int32.init), table: model.embedTokens.weight) }
                                            : Tensor(zeros: [n, d])
        delta = Tensor(zeros: [n, d]).requiringGrad()
        let scale = (Double(d) / 2048).squareRoot()
        epsilon = types.map { t in
            guard t > 0 else { return 1e-10 }
            switch t % 4 {
            case 1, 3: return Float(formatEpsilon * scale)
            case 2: return Float(inputEpsilon * scale)
            default: return 1e-10
            }
        }
        trainMask = Tensor(shape: [n, 1], values: types.map { [1, 2, 3].contains($0 % 4) ? 1 : 0 })
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var keyPrefix: String? { "" }
    public var mergeable: Bool { false }
    public var namedParameters: [(name: String, tensor: Tensor)] { [("delta_embedding", delta)] }
    public var exportedParameters: [(name: String, tensor: Tensor)] {
        [("prompt_embeddings", withNoGrad { project(); return embedding + delta })]
    }
    public func attach() { model.promptAdapters.append(self) }
    public func detach() { model.promptAdapters.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    public func load(_ name: String, from tensor: Tensor) throws {
        guard name == "prompt_embeddings" else {
            throw GraftError.format("unknown CPT tensor '\(name)' (PEFT saves 'prompt_embeddings')")
        }
        guard tensor.shape == embedding.shape else {
            throw GraftError.format("'prompt_embeddings' has shape \(tensor.shape), expected \(embedding.shape) (check cpt_token_ids)")
        }
        embedding.pointer.update(from: tensor.pointer, count: embedding.count)
        delta.pointer.update(repeating: 0, count: delta.count)
    }

    /// Scales each row of `δ` in place to norm at most its `ε` (PEFT's `get_projection`, applied before every
    /// forward pass, so the optimizer's step lands back in the ball before it is used).
    func project() {
        let d = delta.shape[1]
        for i in 0..<delta.shape[0] {
            let row = delta.pointer + i * d
            var sq: Float = 0
            for j in 0..<d { sq += row[j] * row[j] }
            let norm = sq.squareRoot()
            guard norm > 0 else { continue }
            let s = epsilon[i] / max(norm, epsilon[i])
            for j in 0..<d { row[j] *= s }
        }
    }

    public func virtualTokens() -> Tensor {
        withNoGrad { project() }
        return embedding + delta * trainMask
    }
}

/// Context-aware prompt tuning (`CPT`): `cpt_token_ids` (the context's tokens, which also set
/// `num_virtual_tokens`), `cpt_mask`, `cpt_tokens_type_mask`, `opt_projection_epsilon`,
/// `opt_projection_format_epsilon`; causal Llama decoders only, as PEFT. Graft trains with the causal-LM loss on
/// each sequence's own targets; CPT's extra loss terms on label tokens inside the context and the `"decay"` loss
/// weighting are not implemented (`opt_weighted_loss_type: "decay"` loads for inference, and is rejected for
/// training).
public enum CPTFactory: ModuleAdapterFactory {
    public static let peftType = "CPT"
    public static let family = "input (context tokens + projected trained change)"
    public static func exampleConfig(targets: [String]) -> [String: Any] {
        ["cpt_token_ids": [1, 2, 3, 4], "cpt_tokens_type_mask": [1, 2, 2, 3]]
    }

    public static let actsOnInput = true
    public static let requiresDecoder = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        guard let model = module as? LlamaModel else { return nil }
        func intList(_ key: String) throws -> [Int]? {
            switch config.value(key) {
            case nil, is NSNull: return nil
            case let list as [Any]:
                let ints = list.compactMap { JSONScalar.integer($0) }
                guard ints.count == list.count else { throw GraftError.invalid("\(config.source): '\(key)' must be a list of integers") }
                return ints
            case let other?: throw GraftError.invalid("\(config.source): '\(key)' must be a list of integers, got \(other)")
            }
        }
        let ids = try intList("cpt_token_ids") ?? [0]
        let mask = try intList("cpt_mask") ?? ids.map { _ in 1 }
        let types = try intList("cpt_tokens_type_mask") ?? ids.map { _ in 1 }
        guard !ids.isEmpty, mask.count == ids.count, types.count == ids.count else {
            throw GraftError.invalid("\(config.source): cpt_token_ids (\(ids.count)), cpt_mask (\(mask.count)) and cpt_tokens_type_mask (\(types.count)) must have the same, nonzero length")
        }
        if let bad = types.first(where: { $0 < 0 }) {
            throw GraftError.invalid("\(config.source): cpt_tokens_type_mask holds \(bad); token types are 0 (none) or positive")
        }
        if let bad = ids.first(where: { $0 < 0 || $0 >= model.config.vocabSize }) {
            throw GraftError.invalid("\(config.source): cpt_token_ids holds \(bad), outside the vocabulary 0..<\(model.config.vocabSize)")
        }
        let n = try config.int("num_virtual_tokens", default: ids.count)
        guard n == ids.count else {
            throw GraftError.invalid("\(config.source): num_virtual_tokens \(n) differs from the \(ids.count) cpt_token_ids (PEFT sets it from them)")
        }
        let dim = try config.int("token_dim", default: model.config.hiddenSize)
        guard dim == model.config.hiddenSize else {
            throw GraftError.invalid("\(config.source): token_dim \(dim) differs from the model's hidden size \(model.config.hiddenSize)")
        }
        // PEFT records the model's sizes (null for CPT) and checks cpt_mask's length only.
        config.acknowledge("num_attention_heads", "num_layers", "num_transformer_submodules", "tokenizer_name_or_path")
        let inference = try config.bool("inference_mode", default: false)
        let weighting = try config.string("opt_weighted_loss_type") ?? "none"
        guard ["none", "decay"].contains(weighting) else {
            throw GraftError.invalid("\(config.source): opt_weighted_loss_type '\(weighting)' is not 'none' or 'decay'")
        }
        if weighting == "decay", !inference {
            throw GraftError(.unsupported, "\(config.source): opt_weighted_loss_type 'decay' is not supported for training yet ('none')")
        }
        // Loss settings: they change nothing at inference, and with 'none' PEFT ignores the decay factor.
        config.acknowledge("opt_loss_decay_factor")
        return CPTLayer(model: model, tokenIDs: ids, types: types,
                        inputEpsilon: try config.double("opt_projection_epsilon", default: 0.1),
                        formatEpsilon: try config.double("opt_projection_format_epsilon", default: 0.1),
                        initializeFromVocabulary: !inference, state: state)
    }
}
