import GraftModels
import GraftTensor

/// A task vector (Ilharco et al., 2023, "Editing models with task arithmetic"): the weight change `τ = ΔW` an
/// adapter makes to each Linear it adapts, taken from the method's explicit delta (`deltaWeight`: LoRA and its
/// variants, LoHa, LoKr, VeRA, FourierFT, IA³, ... any mergeable Linear adapter, so vectors of different methods
/// add up). Task vectors add (`τ_a + τ_b`: both tasks), negate (`−τ`: forgetting a task), scale (`λτ`) and
/// combine (`Σ λᵢ τᵢ`), then apply to the base weights (`W ← W + λτ`, exactly undone by applying `−λτ` up to float
/// addition). For LoRA adapters the same arithmetic is also exact in factored form through
/// ``AdaptedModel/addWeightedAdapter(_:combining:)`` with `cat` (negation = weight −1).
public struct TaskVector {
    /// `ΔW` per adapted Linear, by module path, with the Linear it changes.
    public private(set) var deltas: [(path: String, linear: Linear, delta: Tensor)]

    /// The task vector of `adapter`: each adapted Linear's `ΔW`. Module adapters and `modules_to_save` copies have
    /// no explicit delta of a Linear and are refused by name.
    public init(_ adapter: NamedAdapter) throws {
        if let (path, _, _) = adapter.savedModules.first {
            throw GraftError(.unsupported, "task vector: adapter '\(adapter.name)' replaces '\(path)' in full (modules_to_save); its delta is not explicit")
        }
        if let (path, _) = adapter.modules.first {
            throw GraftError(.unsupported, "task vector: adapter '\(adapter.name)' (\(adapter.config.peftType)) changes module '\(path)', not a Linear weight")
        }
        var out: [(path: String, linear: Linear, delta: Tensor)] = []
        for (path, linear, layer) in adapter.layers {
            guard let d = layer.deltaWeight(base: linear) else {
                throw GraftError(.unsupported, "task vector: adapter '\(adapter.name)' (\(adapter.config.peftType)) has no explicit weight delta at '\(path)'")
            }
            out.append((path, linear, d))
        }
        deltas = out
    }

    private init(deltas: [(path: String, linear: Linear, delta: Tensor)]) { self.deltas = deltas }

    /// `λτ`.
    public func scaled(by lambda: Float) -> TaskVector {
        TaskVector(deltas: deltas.map { d in (d.path, d.linear, withNoGrad { d.delta * lambda }) })
    }

    /// `−τ`.
    public var negated: TaskVector { scaled(by: -1) }

    /// `Σ λᵢ τᵢ` over the union of the vectors' modules (a module some vector lacks counts as 0 there). Vectors must
    /// come from one model: a path must name the same Linear in each.
    public static func combine(_ vectors: [TaskVector], weights: [Float]) throws -> TaskVector {
        guard !vectors.isEmpty, vectors.count == weights.count else {
            throw GraftError.invalid("task arithmetic: \(vectors.count) task vectors and \(weights.count) weights; give one weight per vector (at least one)")
        }
        if let bad = weights.firstIndex(where: { !$0.isFinite }) {
            throw GraftError.invalid("task arithmetic: weight \(bad) is \(weights[bad])")
        }
        return try sum(vectors, weights)
    }

    private static func sum(_ vectors: [TaskVector], _ weights: [Float]) throws -> TaskVector {
        var order: [String] = []
        var acc: [String: (linear: Linear, delta: Tensor)] = [:]
        for (v, w) in zip(vectors, weights) {
            for (path, linear, d) in v.deltas {
                if let (l, sum) = acc[path] {
                    guard l === linear, sum.shape == d.shape else {
                        throw GraftError.invalid("task arithmetic: '\(path)' is a different Linear in two task vectors (vectors of different models?)")
                    }
                    withNoGrad { sum.addInPlace(d * w) }
                } else {
                    order.append(path)
                    acc[path] = (linear, withNoGrad { d * w })
                }
            }
        }
        return TaskVector(deltas: order.compactMap { p in acc[p].map { (p, $0.linear, $0.delta) } })
    }

    /// `τ + other`.
    public func adding(_ other: TaskVector) throws -> TaskVector { try Self.combine([self, other], weights: [1, 1]) }

    /// The Frobenius norm `‖τ‖` over all modules (accumulated in Double).
    public var norm: Double {
        var s = 0.0
        for (_, _, d) in deltas { for i in 0..<d.count { s += Double(d.pointer[i]) * Double(d.pointer[i]) } }
        return s.squareRoot()
    }

    /// Adds `λτ` to the base weights in place (`W ← W + λτ`); apply `−λ` to take it out again.
    public func apply(scale lambda: Float = 1) {
        withNoGrad {
            for (_, linear, d) in deltas {
                linear.makeWeightDense()
                linear.weight.addInPlace(lambda == 1 ? d : d * lambda)
            }
        }
    }
}

extension AdaptedModel {
    /// The task vector of adapter `name` (see ``TaskVector``).
    public func taskVector(_ name: String) throws -> TaskVector { try TaskVector(try adapter(name)) }
}
