import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// A bare BERT encoder (task ``SessionTask/base``): hidden states only, no head, nothing to train against.
public final class EncoderTaskModel: TaskModel {
    /// The encoder.
    public let bert: BertModel

    /// Wraps `bert`.
    public init(bert: BertModel) { self.bert = bert }

    public var task: SessionTask { .base }
    public var root: Module { bert }
    public var vocabularySize: Int { bert.config.vocabSize }
    public var hiddenSize: Int { bert.config.hiddenSize }
    public var peftTaskType: String { "FEATURE_EXTRACTION" }
    public var configDescription: [String: Any] { bert.config.description }

    public func hiddenStates(_ batch: TokenBatch) throws -> Tensor { try bert.forward(batch) }

    public func logitsPerRow(stride: Int) throws -> Int { throw noHead("logits") }

    public func logits(_ batch: TokenBatch) throws -> Tensor { throw noHead("logits") }

    public func objective() throws -> any TrainingObjective { throw noHead("training") }

    public func examples(batch: TokenBatch, labels: [Int32]?) throws -> [TokenizedExample] { throw noHead("training") }

    public func examples(_ data: TextData, tokenizer: any Tokenizer, maxLength: Int) throws -> [TokenizedExample] {
        throw noHead("training")
    }

    public func loadData(path: String) throws -> TextData { throw noHead("training") }

    public func decoder() throws -> LlamaModel {
        throw GraftError(.unsupported, "generation needs a decoder model (Llama); this is a bert encoder")
    }

    private func noHead(_ what: String) -> GraftError {
        GraftError(.unsupported, "\(what): a BERT model loaded as base has no head; load it for sequence classification (or ask for hidden states)")
    }
}

extension BertConfig {
    /// The sizes under transformers' config names.
    var description: [String: Any] {
        ["vocab_size": vocabSize, "hidden_size": hiddenSize, "num_layers": layers, "num_heads": heads,
         "intermediate_size": intermediateSize, "max_positions": maxPositions]
    }
}
