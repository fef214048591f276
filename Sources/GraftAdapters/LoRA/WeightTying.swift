import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// LoRA's `ensure_weight_tying` (PEFT): when the model ties its output head to its input embedding and the adapter
/// trains the embedding (in `modules_to_save`, `target_modules` or `trainable_token_indices`), PEFT ties the head's
/// adapter to the embedding's. Where no such tie exists — an untied model (BERT, a Llama with its own `lm_head`)
/// or an adapter that trains no embedding — PEFT only warns and the option changes nothing; Graft honours it there
/// the same way. On a tied model with `trainable_token_indices` (Graft's only way to train embedding rows) Graft
/// does not tie the rows into the head yet, so that combination is refused by name.
extension AdaptedModel {
    /// Checks `ensure_weight_tying` against the model and the adapter's embedding training.
    func checkWeightTying(_ config: AdapterConfig) throws {
        guard try config.bool("ensure_weight_tying", default: false) else { return }
        let tied = (root as? LlamaModel)?.tiedHead ?? false
        let trainsRows = config.value("trainable_token_indices").map { !($0 is NSNull) } ?? false
        if tied && trainsRows {
            throw GraftError(.unsupported, "\(config.source): 'ensure_weight_tying' = true with trainable_token_indices on a model whose lm_head is tied to its embedding: Graft does not tie the trained rows into the head yet")
        }
    }
}
