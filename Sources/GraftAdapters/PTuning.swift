import GraftModels
import GraftTensor

/// P-tuning (Liu et al., 2021) while training: the virtual tokens are `MLP(E)`, PEFT's `PromptEncoder` with
/// `encoder_reparameterization_type: "MLP"` — `Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)` over
/// trainable input embeddings `E` `[n, d]`. PEFT saves the encoder's output as `prompt_embeddings`, and so does
/// Graft; such a file (its config has `inference_mode: true`) loads as a ``PromptTuningLayer``.
public final class PTuningEncoderLayer: VirtualTokenLayer, PromptAdapter {
    /// The MLP's layers: weights `[out, in]` and biases, PEFT's `mlp_head.{0,2,4}`.
    public let weights: [Tensor], biases: [Tensor]

    init(host: any PromptHost, virtualTokens: Int, hidden: Int, state: AdapterState) {
        let d = host.embeddingWidth
        var ws: [Tensor] = [], bs: [Tensor] = []
        for (inF, outF) in [(d, hidden), (hidden, hidden), (hidden, d)] {
            // torch.nn.Linear's default init: U(-1/√in, 1/√in) for weight and bias.
            let bound = 1 / Float(inF).squareRoot()
            ws.append(Tensor.randomUniform([outF, inF], low: -bound, high: bound, rng: &state.rng).requiringGrad())
            bs.append(Tensor.randomUniform([outF], low: -bound, high: bound, rng: &state.rng).requiringGrad())
        }
        weights = ws
        biases = bs
        super.init(host: host, rows: virtualTokens, width: d, state: state)
    }

    public func virtualTokens() -> Tensor {
        var h = embeddings
        for i in 0..<3 {
            h = linear(h, weights[i], biases[i])
            if i < 2 { h = relu(h) }
        }
        return h
    }

    public override var namedParameters: [(name: String, tensor: Tensor)] {
        var out: [(String, Tensor)] = [("prompt_encoder.embedding.weight", embeddings)]
        for i in 0..<3 {
            out.append(("prompt_encoder.mlp_head.\(2 * i).weight", weights[i]))
            out.append(("prompt_encoder.mlp_head.\(2 * i).bias", biases[i]))
        }
        return out
    }

    public override var exportedParameters: [(name: String, tensor: Tensor)] {
        [("prompt_embeddings", withNoGrad { virtualTokens() })]
    }

    public override func load(_ name: String, from tensor: Tensor) throws {
        try loadNamedParameter(name, from: tensor, hint: "num_virtual_tokens, encoder_hidden_size")
    }

    public override func attach() { host.promptAdapters.append(self) }
    public override func detach() { host.promptAdapters.removeAll { $0 === self } }
}

/// P-tuning (`P_TUNING`): `num_virtual_tokens`, `encoder_hidden_size` (default: the model's hidden size),
/// `encoder_reparameterization_type` (`MLP`; `LSTM` is not supported). A fresh adapter trains the MLP
/// encoder; a PEFT file (`inference_mode: true`) holds the encoder's output and loads as plain virtual tokens.
public enum PTuningFactory: ModuleAdapterFactory {
    public static let peftType = "P_TUNING"
    public static let family = "input (virtual tokens from an encoder)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["num_virtual_tokens": 8, "encoder_hidden_size": 64] }

    public static let actsOnInput = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        let kind = try config.string("encoder_reparameterization_type") ?? "MLP"
        // PEFT's MLP encoder always has two layers and ignores encoder_num_layers (an LSTM setting).
        config.acknowledge("encoder_num_layers")
        guard kind == "MLP" else {
            throw GraftError(.unsupported, "\(config.source): encoder_reparameterization_type '\(kind)' is not supported (MLP)")
        }
        guard let (host, n) = try virtualTokenTarget(module, config: config) else { return nil }
        if try config.bool("inference_mode", default: false) {
            // The file holds the encoder's output; the encoder's width no longer matters.
            config.acknowledge("encoder_hidden_size")
            return PromptTuningLayer(host: host, virtualTokens: n, state: state)
        }
        let hidden = try config.int("encoder_hidden_size", default: host.embeddingWidth)
        guard hidden > 0 else { throw GraftError.invalid("\(config.source): 'encoder_hidden_size' must be positive, got \(hidden)") }
        return PTuningEncoderLayer(host: host, virtualTokens: n, hidden: hidden, state: state)
    }
}
