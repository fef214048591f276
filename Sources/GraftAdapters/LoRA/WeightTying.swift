import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// LoRA's `ensure_weight_tying` (PEFT): when the model ties its output head to its input embedding and the adapter
/// trains the embedding, PEFT ties the head's adapter to the embedding's. For `trainable_token_indices` (Graft's
/// only way to train embedding rows) PEFT ties them whether or not the option is set, and so does Graft
/// (``TiedHeadTokens``). Where no tie exists — an untied model (BERT, a Llama with its own `lm_head`) or an adapter
/// that trains no embedding — PEFT only warns and the option changes nothing; Graft honours it the same way.
extension AdaptedModel {
    /// Checks that `ensure_weight_tying` is a boolean; the tie itself needs nothing more (see above).
    func checkWeightTying(_ config: AdapterConfig) throws {
        _ = try config.bool("ensure_weight_tying", default: false)
    }

    /// The tied LM head's share of `rows` when they replace rows of a table the head is tied to; nil otherwise.
    func tiedHeadTokens(for rows: TrainableTokensLayer) -> TiedHeadTokens? {
        guard let llama = root as? LlamaModel, llama.tiedHead, rows.table === llama.embedTokens else { return nil }
        return TiedHeadTokens(source: rows, head: llama.lmHead, table: llama.embedTokens)
    }
}
