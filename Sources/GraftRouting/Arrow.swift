import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

/// Arrow zero-shot routing (Ostapenko et al., 2024) over a library of trained LoRA adapters of one model.
///
/// Each library LoRA's prototype at a layer is the top right singular vector `v` of its `ΔW = s·B A` (found by
/// power iteration on `Aᵀ (Bᵀ B) A`, never forming ΔW). At inference each token `x` scores every adapter of the
/// layer by `|⟨vᵢ, x⟩|`, keeps the `topK` best, weights them by `softmax(score / temperature)` over those, and
/// the layer adds `Σᵢ wᵢ · sᵢ Bᵢ Aᵢ x`: each adapter's two GEMMs run on the rows routed to it only. No
/// training. Inference only.
public final class ArrowRouter {
    /// The model the library belongs to.
    public let model: AdaptedModel
    /// The library's adapter names, in routing-index order.
    public let adapterNames: [String]
    /// Adapters each token keeps per layer.
    public var topK: Int
    /// Softmax temperature over the kept scores.
    public var temperature: Float

    final class LayerRoute: LinearAdapter {
        let path: String
        let members: [(Int, LoRALayer)]
        /// `[members, in]` unit prototypes.
        let prototypes: Tensor
        unowned let owner: ArrowRouter
        /// Routing weight mass per library adapter since the last reset.
        var mass: [Double]

        init(path: String, members: [(Int, LoRALayer)], prototypes: Tensor, owner: ArrowRouter, adapters: Int) {
            self.path = path
            self.members = members
            self.prototypes = prototypes
            self.owner = owner
            mass = [Double](repeating: 0, count: adapters)
        }

        var isEnabled: Bool { true }

        func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
            arrowRoutedUpdate(input: x, into: y.pointer, members: members.map(\.1), prototypes: prototypes,
                              topK: owner.topK, temperature: owner.temperature) { j, w in
                self.mass[self.members[j].0] += Double(w)
            }
            return y
        }
    }

    var routes: [(linear: Linear, route: LayerRoute)] = []

    /// Builds prototypes for `adapters` (plain LoRA adapters attached to `model`); throws naming an adapter that
    /// is missing, merged or not plain LoRA.
    public init(model: AdaptedModel, adapters: [String], topK: Int = 1, temperature: Float = 1, powerIterations: Int = 64) throws {
        guard !adapters.isEmpty else { throw GraftError.invalid("an Arrow library needs at least one adapter") }
        guard topK >= 1 else { throw GraftError.invalid("Arrow top_k must be ≥ 1, got \(topK)") }
        guard temperature > 0, temperature.isFinite else { throw GraftError.invalid("Arrow temperature must be positive, got \(temperature)") }
        self.model = model
        adapterNames = adapters
        self.topK = topK
        self.temperature = temperature
        var byLinear: [ObjectIdentifier: (path: String, linear: Linear, members: [(Int, LoRALayer)])] = [:]
        var order: [ObjectIdentifier] = []
        for (i, name) in adapters.enumerated() {
            let named = try model.adapter(name)
            guard !named.state.isMerged else { throw GraftError(.state, "Arrow: adapter '\(name)' is merged; unmerge it first") }
            for (path, lin, layer) in named.layers {
                guard let lora = layer as? LoRALayer, lora.magnitude == nil else {
                    throw GraftError(.unsupported, "Arrow routes plain LoRA adapters; '\(name)' has a \(type(of: layer)) at '\(path)'")
                }
                let key = ObjectIdentifier(lin)
                if byLinear[key] == nil { byLinear[key] = (path, lin, []); order.append(key) }
                byLinear[key]?.members.append((i, lora))
            }
        }
        for key in order {
            guard let entry = byLinear[key] else { continue }
            let inF = entry.linear.inFeatures
            let protos = Tensor(zeros: [entry.members.count, inF])
            for (j, (_, lora)) in entry.members.enumerated() {
                let v = ArrowRouter.prototype(lora, iterations: powerIterations)
                (protos.pointer + j * inF).update(from: v, count: inF)
            }
            routes.append((entry.linear, LayerRoute(path: entry.path, members: entry.members, prototypes: protos, owner: self,
                                                    adapters: adapters.count)))
        }
    }

    /// The top right singular vector (unit norm) of `B A` by power iteration on `Aᵀ (Bᵀ B) A`.
    public static func prototype(_ lora: LoRALayer, iterations: Int) -> [Float] {
        let r = lora.rank, inF = lora.loraA.shape[1], outF = lora.loraB.shape[0]
        var c = [Float](repeating: 0, count: r * r)  // BᵀB
        sgemm(transA: true, transB: false, m: r, n: r, k: outF, a: lora.loraB.pointer, b: lora.loraB.pointer, c: &c)
        var v = (0..<inF).map { 1 + 0.01 * Float($0 % 7) }
        var u = [Float](repeating: 0, count: r), w = [Float](repeating: 0, count: r)
        for _ in 0..<max(iterations, 1) {
            sgemm(transA: false, transB: false, m: r, n: 1, k: inF, a: lora.loraA.pointer, b: v, c: &u)
            sgemm(transA: false, transB: false, m: r, n: 1, k: r, a: c, b: u, c: &w)
            sgemm(transA: true, transB: false, m: inF, n: 1, k: r, a: lora.loraA.pointer, b: w, c: &v)
            let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
            guard norm > 0 else { break }
            for i in 0..<inF { v[i] /= norm }
        }
        return v
    }

    /// Runs `body` (forward passes of `model`) with Arrow routing installed on every layer the library adapts;
    /// restores the layers and the model's adapter switch afterwards.
    public func withRouting<R>(_ body: () throws -> R) rethrows -> R {
        var saved: [(Linear, [any LinearAdapter])] = []
        for (lin, route) in routes {
            saved.append((lin, lin.adapters))
            lin.adapters = [route]
        }
        let wasDisabled = model.adaptersDisabled
        model.setAdaptersDisabled(true)
        defer {
            for (lin, list) in saved { lin.adapters = list }
            model.setAdaptersDisabled(wasDisabled)
        }
        return try withNoGrad { try body() }
    }

    /// Per layer path, the fraction of routing weight each library adapter received since the last reset.
    public var layerShares: [(path: String, shares: [Double])] {
        routes.map { _, route in
            let total = route.mass.reduce(0, +)
            return (route.path, route.mass.map { total > 0 ? $0 / total : 0 })
        }
    }

    /// The fraction of routing weight each library adapter received, over all layers and tokens since the last reset.
    public var shares: [Double] {
        var sum = [Double](repeating: 0, count: adapterNames.count)
        for (_, route) in routes { for (i, m) in route.mass.enumerated() { sum[i] += m } }
        let total = sum.reduce(0, +)
        return sum.map { total > 0 ? $0 / total : 0 }
    }

    /// Clears the routing-weight counters.
    public func resetStatistics() {
        for (_, route) in routes { route.mass = [Double](repeating: 0, count: adapterNames.count) }
    }
}
