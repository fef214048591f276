import GraftIO
import GraftTensor

/// The LoRA initializations that read training data before the first step (PEFT's `init_lora_weights` values
/// `"eva"`, `"lora_ga"` and `"corda"`). PEFT runs them from user code (`initialize_lora_eva_weights` with a
/// dataloader, `preprocess_loraga` with a train step, `preprocess_corda`); Graft runs them once in the shared
/// training path, so every door gets them (see ``NamedAdapter/pendingDataInitialization``).
public enum DataDrivenInitialization: String, Sendable {
    /// EVA: principal components of each layer's inputs, forward passes only.
    case eva
    /// LoRA-GA: SVD of the base weights' gradients, forward and backward passes.
    case loraGA = "lora_ga"
    /// CorDA: SVD of `W·C` with `C` the input covariance, forward passes only.
    case corda

    /// The initialization `config` asks for, or nil (not LoRA, or an initialization that needs no data).
    init?(_ config: AdapterConfig) {
        guard config.peftType == LoRAFactory.peftType, let value = config.value("init_lora_weights") as? String,
              let kind = DataDrivenInitialization(rawValue: value) else { return nil }
        self = kind
    }

    /// Whether the passes must run backward (LoRA-GA reads the gradients of the base weights).
    public var needsGradients: Bool { self == .loraGA }
}

extension NamedAdapter {
    /// Records that the adapter's tensors were filled from a file or another adapter rather than initialized, so no
    /// data-driven initialization will run on it.
    public func markWeightsLoaded() { pendingDataInitialization = nil }
}

extension AdaptedModel {
    /// Runs the data-driven initialization adapter `name` still waits for, if any, and returns it (nil: nothing
    /// to do). `run(needsGradients)` makes the passes over the data: forward only, or forward and `backward()` of
    /// the training loss when `needsGradients` (LoRA-GA). EVA rebuilds the adapter with its new ranks, so fetch it
    /// again by name afterwards.
    @discardableResult
    public func initializePendingAdapter(_ name: String, run: (_ needsGradients: Bool) throws -> Void) throws -> DataDrivenInitialization? {
        let a = try adapter(name)
        guard let kind = a.pendingDataInitialization else { return nil }
        switch kind {
        case .eva: try initializeEVA(name) { try run(false) }
        case .loraGA: try initializeLoRAGA(name) { try run(true) }
        case .corda: try initializeCorDA(name) { try run(false) }
        }
        return kind
    }
}
