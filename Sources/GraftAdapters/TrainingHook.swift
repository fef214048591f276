import GraftTensor

/// Training behaviour of an adapter beyond its forward pass: AdaLoRA's orthogonality penalty and rank allocation,
/// RoSA's mask selection from warm-up gradients, router auxiliary losses.
///
/// ``GraftTrain/Trainer`` calls every hook of the adapter it trains (``NamedAdapter/trainingHooks``): after each
/// micro-batch forward it adds ``regularization()`` to the loss (on the tape, so it is back-propagated); after
/// that micro-batch's backward it calls ``afterBackward(step:)`` (gradients visible); after each optimizer update,
/// before gradients are cleared, ``didUpdate(step:totalSteps:)``. Custom training loops should do the same.
public protocol AdapterTrainingHook: AnyObject {
    /// A term (a scalar recorded on the tape) to add to the objective's loss, or nil.
    func regularization() -> Tensor?
    /// After a micro-batch's backward; `step` is the number of optimizer steps taken so far (the micro-batch
    /// belongs to optimizer step `step`, 0-based).
    func afterBackward(step: Int)
    /// After the optimizer update that completes global step `step` (1-based) of a run of `totalSteps`, before the
    /// gradients are cleared (they are still readable).
    func didUpdate(step: Int, totalSteps: Int)
    /// Lines for the training log about what the hook changed since the last call (IncreLoRA's rank growth,
    /// TAPS' gates switching off), emptied by the call; none by default.
    func takeLogLines() -> [String]
    /// A summary for `graft train --report` after training (per-module ranks over time, layers still adapting);
    /// none by default.
    func reportLines() -> [String]
    /// Parameters whose optimizer state must be forgotten after ``didUpdate(step:totalSteps:)`` because the hook
    /// re-purposed them (LoSiA's sub-matrix after a re-localization), emptied by the call; none by default.
    func takeParametersToReset() -> [Tensor]
}

extension AdapterTrainingHook {
    public func regularization() -> Tensor? { nil }
    public func afterBackward(step: Int) {}
    public func didUpdate(step: Int, totalSteps: Int) {}
    public func takeLogLines() -> [String] { [] }
    public func reportLines() -> [String] { [] }
    public func takeParametersToReset() -> [Tensor] { [] }
}

extension NamedAdapter {
    /// Every hook of the adapter: adapter-wide ones built by its factory (AdaLoRA's allocator), then its layers
    /// that conform (RoSA), then its module adapters that conform (SparseAdapter's pruning).
    public var trainingHooks: [any AdapterTrainingHook] {
        adapterHooks + layers.compactMap { $0.adapter as? any AdapterTrainingHook }
            + modules.compactMap { $0.adapter as? any AdapterTrainingHook }
    }

    /// Calls ``AdapterTrainingHook/afterBackward(step:)`` on every hook.
    public func afterBackward(step: Int) {
        for hook in trainingHooks { hook.afterBackward(step: step) }
    }
}
