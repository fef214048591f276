import GraftModels
import GraftTensor

/// Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021) at inference: learned virtual-token
/// embeddings `[n, hidden]` prepended to every input. PEFT saves P-tuning's encoder output under the same key,
/// so both load as `prompt_embeddings`. (Training P-tuning's MLP/LSTM encoder is not implemented yet.)
public final class PromptTuningLayer: VirtualTokenLayer, PromptAdapter {
    init(host: any PromptHost, virtualTokens: Int, state: AdapterState) {
        super.init(host: host, rows: virtualTokens, width: host.embeddingWidth, state: state)
    }

    public func virtualTokens() -> Tensor { embeddings }
    public override func attach() { host.promptAdapters.append(self) }
    public override func detach() { host.promptAdapters.removeAll { $0 === self } }
}

/// Prompt tuning (`PROMPT_TUNING`) and P-tuning (`P_TUNING`, inference): `num_virtual_tokens`, `token_dim`,
/// `prompt_tuning_init` (`RANDOM`, or `TEXT` is not supported yet). Applies to BERT encoders.
public enum PromptTuningFactory: ModuleAdapterFactory {
    public static let peftType = "PROMPT_TUNING"
    public static let family = "input (virtual tokens)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["num_virtual_tokens": 8] }

    public static let actsOnInput = true

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        if let initMode = try config.string("prompt_tuning_init"), initMode != "RANDOM" {
            throw GraftError(.unsupported, "\(config.source): prompt_tuning_init '\(initMode)' is not supported yet (RANDOM)")
        }
        guard let (host, n) = try virtualTokenTarget(module, config: config) else { return nil }
        return PromptTuningLayer(host: host, virtualTokens: n, state: state)
    }
}
