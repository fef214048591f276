import GraftTensor

/// An adapter layer that takes part in training beyond its forward pass (RoSA picks its sparse mask from the
/// gradients of a warm-up). Trainers call ``afterBackward(step:)`` on every layer of the trained adapter that
/// conforms, after each micro-batch's backward pass and before the optimizer step (so gradients are visible);
/// a layer that does not conform costs nothing. Custom training loops should do the same.
public protocol TrainingStepHook: AnyObject {
    /// Called after a micro-batch's backward; `step` is the number of optimizer steps taken so far (the
    /// micro-batch belongs to optimizer step `step`, 0-based).
    func afterBackward(step: Int)
}

extension NamedAdapter {
    /// The adapter's layers that want ``TrainingStepHook`` calls.
    public var trainingHooks: [any TrainingStepHook] { layers.compactMap { $0.adapter as? any TrainingStepHook } }

    /// Calls ``TrainingStepHook/afterBackward(step:)`` on every hooked layer.
    public func afterBackward(step: Int) {
        for hook in trainingHooks { hook.afterBackward(step: step) }
    }
}
