import GraftTensor

/// BERT with a classification head, as transformers' `BertForSequenceClassification`: the pooled first token
/// (`tanh(pooler.dense(h[:, 0]))`) through dropout and a Linear `classifier` to `numLabels` logits.
///
/// Module paths are `bert.*` and `classifier`, so PEFT `SEQ_CLS` adapter keys map directly.
public final class BertForSequenceClassification: Module {
    /// The encoder (`bert`).
    public let bert: BertModel
    /// The head (`classifier`), `[numLabels, hidden]`.
    public let classifier: Linear
    /// Number of classes.
    public let numLabels: Int

    /// Wraps `bert` with a new head drawn as transformers initializes it (N(0, 0.02²) weight, zero bias).
    public init(bert: BertModel, numLabels: Int, seed: UInt64 = 0) throws {
        guard numLabels >= 1, numLabels <= 1 << 20 else { throw GraftError.invalid("num_labels must be in 1...1048576, got \(numLabels)") }
        guard bert.pooler != nil else {
            throw GraftError(.unsupported, "sequence classification needs the checkpoint's pooler (pooler.dense), which this one lacks")
        }
        self.bert = bert
        self.numLabels = numLabels
        var rng = GraftRNG(seed: seed)
        classifier = Linear(weight: Tensor.randomNormal([numLabels, bert.config.hiddenSize], std: 0.02, rng: &rng),
                            bias: Tensor(zeros: [numLabels]))
        super.init(typeName: "BertForSequenceClassification")
        register("bert", bert)
        register("classifier", classifier)
    }

    /// Logits `[sequences, numLabels]`: one row per batch row, or per packed sequence when `firstTokens`
    /// (flat indices of each sequence's first token) is given.
    /// With ``BertModel/tokenReduction`` enabled, the encoder reduces each sequence's tokens on the way (TR-PTS).
    public func forward(_ batch: TokenBatch, firstTokens: [Int32]? = nil) throws -> Tensor {
        if let reduction = bert.tokenReduction, reduction.isEnabled() {
            let (hidden, picks) = try bert.forwardReducingTokens(batch, firstTokens: firstTokens, reduction: reduction)
            return classifier.forward(try bert.pool(hidden, tokens: picks))
        }
        let hidden = try bert.forward(batch)
        return classifier.forward(try bert.pool(hidden, tokens: firstTokens))
    }
}
