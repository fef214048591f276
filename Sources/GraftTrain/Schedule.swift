#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A learning-rate schedule: the multiplier of the base learning rate at each step, as transformers'
/// `get_{constant,linear,cosine}_schedule_with_warmup` define them.
public struct LearningRateSchedule: Sendable, Equatable {
    /// The shape after warm-up.
    public enum Kind: String, Sendable, CaseIterable {
        /// Constant after warm-up.
        case constant
        /// Linear decay to 0 at `totalSteps`.
        case linear
        /// Half-cosine decay to 0 at `totalSteps`.
        case cosine
    }
    /// The shape after warm-up.
    public var kind: Kind
    /// Steps of linear warm-up from 0.
    public var warmupSteps: Int
    /// Total optimizer steps (for the decaying kinds).
    public var totalSteps: Int

    /// Creates a schedule.
    public init(kind: Kind, warmupSteps: Int = 0, totalSteps: Int = 0) {
        self.kind = kind
        self.warmupSteps = warmupSteps
        self.totalSteps = totalSteps
    }

    /// The multiplier for optimizer step `step` (0-based: the first update uses step 0).
    public func multiplier(at step: Int) -> Float {
        if step < warmupSteps { return Float(step) / Float(max(1, warmupSteps)) }
        switch kind {
        case .constant:
            return 1
        case .linear:
            return max(0, Float(totalSteps - step) / Float(max(1, totalSteps - warmupSteps)))
        case .cosine:
            let progress = Double(step - warmupSteps) / Double(max(1, totalSteps - warmupSteps))
            return Float(max(0, 0.5 * (1 + cos(Double.pi * progress))))
        }
    }
}
