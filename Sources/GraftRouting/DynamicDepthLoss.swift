import GraftModels
import GraftTensor

extension LlamaModel {
    /// The next-token cross-entropy of `batch` against `targets` (one per token, row-major) with `policy` installed
    /// as the depth policy: the part every dynamic-depth method's training loss shares (Dr.LLM,
    /// Mixture-of-Recursions), before each adds its compute penalty. `method` names the method in errors.
    func dynamicDepthLanguageLoss(policy: AnyObject, method: String, batch: TokenBatch, targets: [Int32]) throws -> Tensor {
        guard depthPolicy === policy else { throw GraftError(.state, "\(method): the routing is not the model's depth policy") }
        return try nextTokenLoss(batch: batch, targets: targets, method: method)
    }
}
