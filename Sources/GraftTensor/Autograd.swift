#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One recorded operation: the tracked inputs and the closure that maps the output's gradient to theirs.
///
/// The closure captures the activations it needs; ``Tensor/backward(_:)`` drops it as soon as it has run,
/// so saved activations are freed while backward proceeds.
final class GradNode {
    var inputs: [Tensor]
    var backward: ((Tensor) -> [Tensor?])?

    init(inputs: [Tensor], backward: @escaping (Tensor) -> [Tensor?]) {
        self.inputs = inputs
        self.backward = backward
    }
}

private let gradModeKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key, nil)
    return key
}()

/// Whether operations on this thread record onto the autograd graph.
public enum GradMode {
    /// True unless the current thread is inside ``withNoGrad(_:)``.
    public static var isEnabled: Bool {
        pthread_getspecific(gradModeKey) == nil
    }

    static func set(enabled: Bool) {
        pthread_setspecific(gradModeKey, enabled ? nil : UnsafeRawPointer(bitPattern: 1))
    }

    /// How many operations this thread has recorded onto autograd graphs (a diagnostic: tests use it to show
    /// that frozen sub-graphs are not recorded).
    public static var recordedOperations: Int {
        Int(bitPattern: pthread_getspecific(recordCountKey))
    }

    static func countRecord() {
        pthread_setspecific(recordCountKey, UnsafeRawPointer(bitPattern: recordedOperations + 1))
    }
}

private let recordCountKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key, nil)
    return key
}()

/// Runs `body` with gradient recording off on this thread (inference, optimizer updates, backward itself).
public func withNoGrad<R>(_ body: () throws -> R) rethrows -> R {
    let previous = GradMode.isEnabled
    GradMode.set(enabled: false)
    defer { GradMode.set(enabled: previous) }
    return try body()
}

extension Tensor {
    /// Wraps an op's freshly computed result, recording `backward` when grad mode is on and any input is tracked.
    ///
    /// `backward` receives the gradient of the output and returns one gradient per input, in order
    /// (nil where the input is not tracked; ops check `inputs[i].requiresGrad` to skip work).
    public static func result(
        _ output: Tensor, inputs: [Tensor], backward: @escaping (Tensor) -> [Tensor?]
    ) -> Tensor {
        if GradMode.isEnabled, inputs.contains(where: { $0.requiresGrad }) {
            output.requiresGrad = true
            output.node = GradNode(inputs: inputs, backward: backward)
            GradMode.countRecord()
        }
        return output
    }

    /// Back-propagates from this tensor, accumulating into ``grad`` of every trainable leaf it depends on.
    ///
    /// - Parameter seed: the gradient of the final objective with respect to this tensor; defaults to ones
    ///   (the usual call on a scalar loss).
    /// The graph is consumed: intermediate nodes release their saved activations as they are visited.
    public func backward(_ seed: Tensor? = nil) {
        guard requiresGrad else { return }
        let start = seed ?? Tensor(repeating: 1, shape: shape)
        // Iterative post-order DFS for a topological order (deep graphs must not overflow the stack).
        var order: [Tensor] = []
        var visited = Set<ObjectIdentifier>()
        var stack: [(Tensor, Bool)] = [(self, false)]
        while let (t, expanded) = stack.popLast() {
            if expanded { order.append(t); continue }
            if visited.contains(ObjectIdentifier(t)) { continue }
            visited.insert(ObjectIdentifier(t))
            stack.append((t, true))
            if let node = t.node {
                for input in node.inputs where input.requiresGrad && !visited.contains(ObjectIdentifier(input)) {
                    stack.append((input, false))
                }
            }
        }
        var grads: [ObjectIdentifier: Tensor] = [ObjectIdentifier(self): start]
        withNoGrad {
            for t in order.reversed() {
                guard let g = grads.removeValue(forKey: ObjectIdentifier(t)) else { continue }
                guard let node = t.node else {
                    if let existing = t.grad {
                        existing.addInPlace(g)
                    } else {
                        // Own the buffer: ops may hand the same gradient tensor to several inputs.
                        t.grad = g.copy()
                    }
                    continue
                }
                if let fn = node.backward {
                    let inputGrads = fn(g)
                    for (input, ig) in zip(node.inputs, inputGrads) {
                        guard input.requiresGrad, let ig else { continue }
                        let key = ObjectIdentifier(input)
                        if let existing = grads[key] {
                            // A fresh buffer is needed if `existing` may alias another tensor.
                            grads[key] = existing.adding(ig)
                        } else {
                            grads[key] = ig
                        }
                    }
                }
                node.backward = nil
                node.inputs = []
                t.node = nil
            }
        }
    }

    /// Clears ``grad``.
    public func zeroGrad() { grad = nil }
}
