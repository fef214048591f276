/// How a model is loaded: the one definition of these options, their defaults and their checks. The C ABI's
/// `graft_model_params`, graftd's `LoadModel`, the CLI's flags and the bindings all translate into it.
public struct ModelOptions: Sendable, Equatable {
    /// What the model is loaded for. Default ``SessionTask/base``.
    public var task: SessionTask = .base
    /// Classes of the sequence-classification head (≥ 1; ignored for other tasks). Default 2.
    public var numLabels: Int = 2
    /// Seed of the classification head's initialisation. Default 0.
    public var seed: UInt64 = 0
    /// Threads for all Graft work in the process; 0 keeps the current setting. Default 0.
    public var numThreads: Int = 0
    /// The number format frozen weights are multiplied in. Default float32 (exact).
    public var computeDType: ComputeDType = .float32
    /// A directory `graft moefy --output` wrote (`moe_config.json` + `moe_routers.safetensors`): the decoder is made
    /// that MoE base at load, for the adapters that tune an MoE base's experts (ESFT, PERFT, MOE_PLORA). Needs a
    /// Llama decoder. Default nil (the dense model).
    public var moeBase: String?

    /// The defaults.
    public init() {}

    /// Throws naming the first field out of range.
    public func validate() throws {
        guard numThreads >= 0 else { throw GraftError.invalid("num_threads must be ≥ 0 (0 = keep the current setting), got \(numThreads)") }
        if task == .sequenceClassification, numLabels < 1 {
            throw GraftError.invalid("num_labels must be ≥ 1 for sequence classification, got \(numLabels)")
        }
        if let moeBase, moeBase.isEmpty { throw GraftError.invalid("moe_base is empty; give a directory graft moefy --output wrote, or leave it unset") }
    }
}
