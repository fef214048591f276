import GraftModels
import GraftTensor
import GraftText
import GraftTrain

/// BERT with a classification head (transformers' `BertForSequenceClassification`), trained with cross entropy
/// on one class per sequence. Optionally carries the names of its classes (transformers' `id2label`), which
/// string labels in data files are numbered by and which are saved beside the adapter.
public final class SequenceClassificationTaskModel: TaskModel {
    /// The encoder with its head.
    public let classifier: BertForSequenceClassification
    /// The class names by index (`id2label`); nil until data or a saved adapter names them.
    public var labelNames: [String]?

    /// Draws a head of `numLabels` classes over `bert` from `seed`; `labelNames`, when given, must name each class.
    public init(bert: BertModel, numLabels: Int, seed: UInt64, labelNames: [String]? = nil) throws {
        classifier = try BertForSequenceClassification(bert: bert, numLabels: numLabels, seed: seed)
        if let labelNames { try Self.check(labelNames, numLabels: numLabels, source: "label names") }
        self.labelNames = labelNames
    }

    /// The number of classes.
    public var numLabels: Int { classifier.numLabels }
    public var task: SessionTask { .sequenceClassification }
    public var root: Module { classifier }
    public var vocabularySize: Int { classifier.bert.config.vocabSize }
    public var hiddenSize: Int { classifier.bert.config.hiddenSize }
    public var peftTaskType: String { "SEQ_CLS" }
    public var configDescription: [String: Any] {
        var d = classifier.bert.config.description
        d["num_labels"] = numLabels
        if let labelNames { d["id2label"] = ClassLabelFile.id2label(labelNames) }
        return d
    }

    public func hiddenStates(_ batch: TokenBatch) throws -> Tensor { try classifier.bert.forward(batch) }

    public func logitsPerRow(stride: Int) throws -> Int { numLabels }

    public func logits(_ batch: TokenBatch) throws -> Tensor { try classifier.forward(batch) }

    public func objective() throws -> any TrainingObjective { SequenceClassificationObjective(model: classifier) }

    public func examples(batch: TokenBatch, labels: [Int32]?) throws -> [TokenizedExample] {
        guard let labels else { throw GraftError.invalid("labels: sequence classification needs one class per sequence (got NULL)") }
        guard labels.count == batch.batchSize else {
            throw GraftError.invalid("labels: \(labels.count) classes for \(batch.batchSize) sequences")
        }
        return try (0..<batch.batchSize).map { b in
            guard labels[b] >= 0, Int(labels[b]) < numLabels else {
                throw GraftError.invalid("labels[\(b)] = \(labels[b]) is outside 0..<\(numLabels) (num_labels)")
            }
            return TokenizedExample(ids: Array(batch.row(b)), label: labels[b])
        }
    }

    public func examples(_ data: TextData, tokenizer: any Tokenizer, maxLength: Int) throws -> [TokenizedExample] {
        guard case .labeled(let texts) = data else {
            throw GraftError.invalid("sequence classification trains on {\"text\", \"label\"} examples, not prompt/completion pairs")
        }
        if let bad = texts.first(where: { $0.label < 0 || $0.label >= numLabels }) {
            throw GraftError.invalid("label \(bad.label) is outside 0..<\(numLabels) (num_labels) for text \"\(bad.text.prefix(40))\"")
        }
        return try ExampleTokenizer.classification(texts, tokenizer: tokenizer, maxLength: maxLength)
    }

    /// Reads `{"text", "label"}` lines. String labels are numbered by ``labelNames`` when the model has them
    /// (an unknown name is an error naming the line); otherwise by first appearance, and the names found become
    /// the model's ``labelNames`` (at most ``numLabels`` of them).
    public func loadData(path: String) throws -> TextData {
        var names = labelNames ?? []
        let texts = try JSONLDataset.loadClassification(path: path, labelNames: &names)
        if labelNames == nil, !names.isEmpty {
            guard names.count <= numLabels else {
                throw GraftError.invalid("\(path): \(names.count) label names (\(names.prefix(8).joined(separator: ", "))) for \(numLabels) classes (num_labels)")
            }
            // Classes the data does not name keep their index as their name.
            labelNames = names + (names.count..<numLabels).map { "LABEL_\($0)" }
        }
        return .labeled(texts)
    }

    public func decoder() throws -> LlamaModel {
        throw GraftError(.unsupported, "generation needs a decoder model (Llama); this is a bert encoder")
    }

    /// Throws unless `names` holds `numLabels` distinct names.
    static func check(_ names: [String], numLabels: Int, source: String) throws {
        guard names.count == numLabels else {
            throw GraftError.invalid("\(source): \(names.count) class names for \(numLabels) classes (num_labels)")
        }
        guard Set(names).count == names.count else {
            throw GraftError.invalid("\(source): class names repeat (\(names.joined(separator: ", ")))")
        }
    }
}
