import Foundation
import GraftTensor

/// A layer adapter that takes part in training beyond its forward pass (router auxiliary losses, rank schedules).
///
/// ``GraftTrain/Trainer`` asks every layer of the adapter being trained that conforms: after each micro-batch
/// forward it adds ``regularization()`` to the loss (on the tape, so it is back-propagated), and after each
/// optimizer update it calls ``didUpdate(step:totalSteps:)``.
public protocol AdapterTrainingHook: AnyObject {
    /// An extra loss term recorded on the tape from the last forward passes (a scalar), or nil for none. Called
    /// once per micro-batch after the forward; implementations drop what they kept for it.
    func regularization() -> Tensor?
    /// Called after each optimizer update with the 1-based step just taken.
    func didUpdate(step: Int, totalSteps: Int)
}

extension AdapterTrainingHook {
    public func regularization() -> Tensor? { nil }
    public func didUpdate(step: Int, totalSteps: Int) {}
}

extension NamedAdapter {
    /// The adapter's layers that take part in training through ``AdapterTrainingHook``.
    public var trainingHooks: [any AdapterTrainingHook] { layers.compactMap { $0.adapter as? any AdapterTrainingHook } }
}

/// Factories added at run time by modules that build on GraftAdapters (GraftRouting's expert mixtures), which
/// the static ``AdapterRegistry/factories`` table cannot name.
final class RegisteredFactories: @unchecked Sendable {
    static let shared = RegisteredFactories()
    private let lock = NSLock()
    private var table: [String: any AdapterMethodFactory.Type] = [:]

    var all: [String: any AdapterMethodFactory.Type] { lock.withLock { table } }
    func add(_ f: any AdapterMethodFactory.Type) { lock.withLock { table[f.peftType.uppercased()] = f } }
}

extension AdapterRegistry {
    /// Registers a Linear-layer method defined outside GraftAdapters (idempotent). Built-in types keep priority.
    public static func register(_ factory: any AdapterMethodFactory.Type) {
        RegisteredFactories.shared.add(factory)
    }

    /// Built-in and registered Linear-layer factories, keyed by upper-case `peft_type`.
    public static var allFactories: [String: any AdapterMethodFactory.Type] {
        factories.merging(RegisteredFactories.shared.all) { builtIn, _ in builtIn }
    }
}
