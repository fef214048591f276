import GraftDistributed
import GraftTensor

/// Data-parallel training: what one rank of a ``Trainer/processGroup`` does differently from a lone process.
///
/// - Sharding: epoch `e`'s order is the same seeded shuffle on every rank; global micro-batch `b` is positions
///   `b·G ..< (b+1)·G` of it (`G` = ``Trainer/globalBatchSize``) and rank `r` takes the `r`-th `batchSize`
///   slice, so the ranks together see exactly the batch one process with batch `G` would.
/// - Gradients: each rank weights its loss by its share of the counted items (``Trainer/accumulateShare(_:)``),
///   the optimizer step sums gradients over the ranks first (``GradientAllreduce``), then clips the global
///   norm and updates identically everywhere.
/// - Start-up check: options, data and the model (initial adapter weights included) are fingerprinted and
///   compared over the group before the first step; a mismatch is an error naming the differing ranks.
/// - Dropout draws from a per-rank RNG, so masks differ from one process's: equivalence holds with dropout 0.
extension Trainer {
    /// This rank's slice of global micro-batch `b` of an epoch's `order` (empty when the epoch's last global
    /// batch is too short to reach this rank).
    func shareOfBatch(_ b: Int, of order: [Int]) -> ArraySlice<Int> {
        let end = min(order.count, (b + 1) * globalBatchSize)
        let lo = min(end, b * globalBatchSize + processGroup.rank * config.batchSize)
        let hi = min(end, lo + config.batchSize)
        return order[lo..<hi]
    }

    /// Compares this run's fingerprints with every rank's (see the type's notes); `data` nil checks options and
    /// model only (a driver that feeds its own batches through ``accumulate(_:)``).
    func verifyGroup(data: [TokenizedExample]?, maxSteps: Int?) throws {
        var options = RunFingerprint()
        options.combine(String(describing: config))
        options.combine(maxSteps ?? -1)
        options.combine(globalStep)
        options.combine(microStep)
        var modelPrint = modelIdentity
        for p in optimizer.parameters { modelPrint.combine(p) }
        var parts = [(name: "options", fingerprint: options), (name: "model and adapter", fingerprint: modelPrint)]
        if let data {
            var d = RunFingerprint()
            d.combine(data.count)
            for e in data {
                d.combine(e.ids)
                d.combine(e.label)
                d.combine(e.targets)
                d.combine(e.taskID)
            }
            parts.append((name: "training data", fingerprint: d))
        }
        try processGroup.verifyIdentical(parts)
        verifiedGroup = true
    }
}
