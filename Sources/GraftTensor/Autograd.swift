#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where an input's gradient goes: the node that computed it, or a trainable leaf (a parameter) whose
/// ``Tensor/grad`` receives it.
///
/// An edge names the producing node, not the intermediate tensor, so the graph alone keeps no activation alive:
/// only what the backward closures capture stays in memory until backward.
enum GradEdge {
    case node(GradNode)
    case leaf(Tensor)
}

/// One recorded operation: where its tracked inputs' gradients go and the closure that maps the output's
/// gradient to theirs.
///
/// The closure captures the activations it needs; ``Tensor/backward(_:)`` drops it as soon as it has run,
/// so saved activations are freed while backward proceeds.
final class GradNode {
    /// One entry per input, in order; nil for an input that is not tracked.
    var edges: [GradEdge?]
    var backward: ((Tensor) -> [Tensor?])?

    init(inputs: [Tensor], backward: @escaping (Tensor) -> [Tensor?]) {
        edges = inputs.map { input in
            guard input.requiresGrad else { return nil }
            return input.node.map { .node($0) } ?? .leaf(input)
        }
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
        guard let root = node else {
            accumulateLeafGradient(start)
            return
        }
        // Iterative post-order DFS for a topological order (deep graphs must not overflow the stack).
        var order: [GradNode] = []
        var visited = Set<ObjectIdentifier>()
        var stack: [(GradNode, Bool)] = [(root, false)]
        while let (n, expanded) = stack.popLast() {
            if expanded { order.append(n); continue }
            if visited.contains(ObjectIdentifier(n)) { continue }
            visited.insert(ObjectIdentifier(n))
            stack.append((n, true))
            for case .node(let input)? in n.edges where !visited.contains(ObjectIdentifier(input)) {
                stack.append((input, false))
            }
        }
        var grads: [ObjectIdentifier: Tensor] = [ObjectIdentifier(root): start]
        // Leaves in the order their first gradient arrived, with the sum of what arrived.
        var leaves: [(tensor: Tensor, grad: Tensor)] = []
        var leafIndex: [ObjectIdentifier: Int] = [:]
        withNoGrad {
            for n in order.reversed() {
                guard let g = grads.removeValue(forKey: ObjectIdentifier(n)) else { continue }
                if let fn = n.backward {
                    let inputGrads = fn(g)
                    for (edge, ig) in zip(n.edges, inputGrads) {
                        guard let edge, let ig else { continue }
                        switch edge {
                        case .node(let input):
                            let key = ObjectIdentifier(input)
                            // A fresh buffer is needed if `existing` may alias another tensor.
                            grads[key] = grads[key].map { $0.adding(ig) } ?? ig
                        case .leaf(let leaf):
                            let key = ObjectIdentifier(leaf)
                            if let i = leafIndex[key] {
                                leaves[i].grad = leaves[i].grad.adding(ig)
                            } else {
                                leafIndex[key] = leaves.count
                                leaves.append((leaf, ig))
                            }
                        }
                    }
                }
                n.backward = nil
                n.edges = []
            }
            for (leaf, g) in leaves { leaf.accumulateLeafGradient(g) }
        }
        node = nil
    }

    /// Adds `g` to this leaf's ``grad`` (a copy of it when there is none: ops may hand the same gradient
    /// tensor to several inputs).
    private func accumulateLeafGradient(_ g: Tensor) {
        if let existing = grad {
            existing.addInPlace(g)
        } else {
            grad = g.copy()
        }
    }

    /// Clears ``grad``.
    public func zeroGrad() { grad = nil }
}
