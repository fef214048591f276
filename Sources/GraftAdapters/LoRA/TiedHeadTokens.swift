import GraftModels
import GraftTensor

/// The LM head's side of trainable token rows on a model whose head is tied to its input embedding (SmolLM2's
/// `tie_word_embeddings`). PEFT wraps the tied head too, sharing the embedding's trained rows (`tied_adapter`), so
/// a listed token's logit is `x · rows[k]` instead of `x · W[id]`. This adds `x · (rows[k] − W[id])` to those
/// columns of the base logits; it has no parameters of its own (PEFT's file holds the rows once, under the
/// embedding), and merging the embedding's rows into the shared table merges this too.
final class TiedHeadTokens: ModuleAdapterMethod, LinearAdapter {
    let state: AdapterState
    /// The embedding's trainable rows, whose `rows` this shares.
    let source: TrainableTokensLayer
    let head: Linear
    /// The table's own rows for the listed tokens, `[tokens, dim]`, constant.
    let tableRows: Tensor

    init(source: TrainableTokensLayer, head: Linear, table: Embedding) {
        state = source.state
        self.source = source
        self.head = head
        tableRows = table.baseRows(source.tokenIndices)
    }

    var isEnabled: Bool { source.isEnabled }
    var namedParameters: [(name: String, tensor: Tensor)] { [] }
    func attach() { head.adapters.append(self) }
    func detach() { head.adapters.removeAll { $0 === self } }
    func merge() -> [Tensor] { [] }
    func unmerge(_ saved: [Tensor]) {}

    func load(_ name: String, from tensor: Tensor) throws {
        throw GraftError.format("unknown tensor '\(name)' for the tied LM head's token rows (PEFT saves them under the embedding)")
    }

    func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let dim = tableRows.shape[1], vocab = y.lastDim, tokens = source.tokenIndices.count
        let rows = x.count / dim
        let change = matmul(x.reshaped([rows, dim]), source.rows - tableRows, transposeB: true)  // [rows, tokens]
        let rowIndex = (0..<rows).flatMap { r in [Int32](repeating: Int32(r), count: tokens) }
        let columns = [[Int32]](repeating: source.tokenIndices, count: rows).flatMap { $0 }
        let scattered = denseFromSparse(change.reshaped([rows * tokens]), rowIndex: rowIndex, colIndex: columns,
                                        rows: rows, cols: vocab)
        return y + scattered.reshaped(y.shape)
    }
}
