import GraftModels
import GraftTensor

/// What a trainer minimizes and how it scores held-out data.
public protocol TrainingObjective: AnyObject {
    /// The scalar loss of a batch, recorded for backward.
    func loss(_ batch: PackedBatch) throws -> Tensor
    /// Loss (summed over counted items), number correct, and items counted, without recording.
    func evaluate(_ batch: PackedBatch) throws -> (lossSum: Double, correct: Int, count: Int)
    /// The items ``loss(_:)`` averages over (sequences, or targeted tokens): data-parallel ranks weight their
    /// gradients by it so that the sum over ranks is the gradient of the mean over the whole global batch.
    func countedItems(_ batch: PackedBatch) -> Int
}

extension TrainingObjective {
    /// Targeted tokens when the batch has next-token targets, else its sequences (one label each).
    public func countedItems(_ batch: PackedBatch) -> Int {
        batch.targets.isEmpty ? batch.labels.count : batch.targets.reduce(0) { $0 + ($1 == -100 ? 0 : 1) }
    }
}

/// BertForSequenceClassification's objective: mean cross entropy of each sequence's logits.
public final class SequenceClassificationObjective: TrainingObjective {
    /// The model.
    public let model: BertForSequenceClassification

    /// Wraps the model.
    public init(model: BertForSequenceClassification) {
        self.model = model
    }

    func checkLabels(_ batch: PackedBatch) throws {
        if let bad = batch.labels.first(where: { $0 < 0 || Int($0) >= model.numLabels }) {
            throw GraftError.invalid("label \(bad) is outside 0..<\(model.numLabels) (num_labels)")
        }
    }

    public func loss(_ batch: PackedBatch) throws -> Tensor {
        try checkLabels(batch)
        return crossEntropy(try model.forward(batch.tokens, firstTokens: batch.isPacked ? batch.firstTokens : nil), targets: batch.labels)
    }

    public func evaluate(_ batch: PackedBatch) throws -> (lossSum: Double, correct: Int, count: Int) {
        try checkLabels(batch)
        return try withNoGrad {
            let logits = try model.forward(batch.tokens, firstTokens: batch.isPacked ? batch.firstTokens : nil)
            let loss = crossEntropy(logits, targets: batch.labels)
            var correct = 0
            let c = model.numLabels
            for (r, label) in batch.labels.enumerated() {
                var best = 0
                for j in 1..<c where logits.pointer[r * c + j] > logits.pointer[r * c + best] { best = j }
                if best == Int(label) { correct += 1 }
            }
            return (Double(loss.item) * Double(batch.labels.count), correct, batch.labels.count)
        }
    }
}

/// Causal language modelling: mean next-token cross entropy over targeted positions, computed in chunks.
public final class CausalLMObjective: TrainingObjective {
    /// The model.
    public let model: LlamaModel

    /// Wraps the model.
    public init(model: LlamaModel) {
        self.model = model
    }

    public func loss(_ batch: PackedBatch) throws -> Tensor {
        try checkTargets(batch)
        let hidden = try model.hiddenStates(batch.tokens)
        return headLoss(hidden.reshaped([batch.tokenCount, model.config.hiddenSize]), targets: batch.targets)
    }

    /// The chunked loss through `lm_head`: a compact frozen head (a GGUF table) is decoded tile by tile inside the
    /// loss, never as a whole float32 copy; a float32 or bfloat16 head is multiplied as it is. A head with enabled
    /// adapters (trainable token rows tied into it) computes its logits through them.
    func headLoss(_ hidden: Tensor, targets: [Int32]) -> Tensor {
        let head = model.lmHead
        if head.adapters.contains(where: { $0.isEnabled }) {
            return crossEntropy(head.forward(hidden), targets: targets)
        }
        if let compact = head.compactWeight, head.computeDType != .bfloat16 {
            return linearCrossEntropy(hidden, frozen: compact, targets: targets)
        }
        return linearCrossEntropy(hidden, weight: head.weight, narrow: head.frozenNarrowWeight, targets: targets)
    }

    func checkTargets(_ batch: PackedBatch) throws {
        guard batch.targets.count == batch.tokenCount else {
            throw GraftError.invalid("causal LM batch has \(batch.targets.count) targets for \(batch.tokenCount) tokens")
        }
        if let (i, t) = batch.targets.enumerated().first(where: { $0.element != -100 && ($0.element < 0 || Int($0.element) >= model.config.vocabSize) }) {
            throw GraftError.invalid("target \(t) at token \(i) is outside the vocabulary 0..<\(model.config.vocabSize) (use -100 to skip a position)")
        }
    }

    public func evaluate(_ batch: PackedBatch) throws -> (lossSum: Double, correct: Int, count: Int) {
        try checkTargets(batch)
        return try withNoGrad {
            let counted = batch.targets.filter { $0 != -100 }.count
            let hidden = try model.hiddenStates(batch.tokens).reshaped([batch.tokenCount, model.config.hiddenSize])
            let loss = headLoss(hidden, targets: batch.targets)
            // Next-token accuracy on targeted positions, a chunk of rows at a time (never [rows, vocab] at once).
            var correct = 0
            let rows = (0..<batch.tokenCount).filter { batch.targets[$0] != -100 }
            let v = model.config.vocabSize
            for start in stride(from: 0, to: rows.count, by: 128) {
                let chunk = rows[start..<min(rows.count, start + 128)]
                let logits = model.lmHead.forward(embedding(chunk.map(Int32.init), table: hidden))
                for (i, r) in chunk.enumerated() {
                    var best = 0
                    for j in 1..<v where logits.pointer[i * v + j] > logits.pointer[i * v + best] { best = j }
                    if best == Int(batch.targets[r]) { correct += 1 }
                }
            }
            return (Double(loss.item) * Double(counted), correct, counted)
        }
    }
}
