import GraftModels
import GraftTensor

extension AdaptedModel {
    /// Refuses Linear targets that an MoE feed-forward block (``LlamaDecoderLayer/feedForwardOverride``, made by
    /// `graft moefy`) replaces: the layer never runs them, so an adapter there would silently do nothing.
    func checkNotReplacedByMoE(_ targets: [(path: String, layer: Linear)], source: String) throws {
        guard let llama = root as? LlamaModel else { return }
        let replaced = Set(llama.layers.filter { $0.feedForwardOverride != nil }
            .flatMap { $0.denseFeedForwardProjections.map(ObjectIdentifier.init) })
        if let hit = targets.first(where: { replaced.contains(ObjectIdentifier($0.layer)) }) {
            throw GraftError(.unsupported, "\(source): target '\(hit.path)' is part of a dense MLP that an MoE block replaces (graft moefy), so an adapter there would not apply; target the attention projections, or remove the MoE blocks first")
        }
    }
}
