import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// Task arithmetic on explicit weight deltas: τ is the method's ΔW, vectors add, negate and scale linearly, and
/// applying τ to the base weights gives the adapter's own output (and −τ takes it out again), across methods.
@Suite(.serialized) struct TaskArithmeticTests {
    static func model() throws -> (BertModel, AdaptedModel) {
        let (bert, model) = try AdapterCombinationTests.modelWithSources()
        // A LoHa adapter with every factor nonzero (its default init makes ΔW = 0).
        let loha = try model.addAdapter("loha", config: try AdapterConfig(jsonText: #"{"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["query", "dense"]}"#, source: "test"))
        for (k, (_, t)) in loha.peftStateDict.enumerated() {
            for i in 0..<t.count { t.pointer[i] = 0.2 * sin(Float(i * 7 + k * 13)) }
        }
        return (bert, model)
    }

    static func output(_ bert: BertModel) throws -> Tensor { try AdapterCombinationTests.output(bert) }

    @Test func loraTaskVectorIsScaledBA() throws {
        let (_, model) = try Self.model()
        let tau = try model.taskVector("a")
        let a = try model.adapter("a")
        #expect(tau.deltas.count == a.layers.count && tau.deltas.count > 0)
        for ((path, _, d), (_, _, layer)) in zip(tau.deltas, a.layers) {
            guard let l = layer as? LoRALayer else { Issue.record("\(path) is not LoRA"); continue }
            let (out, inn, r) = (l.loraB.shape[0], l.loraA.shape[1], l.rank)
            var worst: Double = 0
            for i in 0..<out {
                for j in 0..<inn {
                    var s = 0.0
                    for k in 0..<r { s += Double(l.loraB.pointer[i * r + k]) * Double(l.loraA.pointer[k * inn + j]) }
                    worst = worse(worst, abs(Double(l.scaling) * s - Double(d.pointer[i * inn + j])))
                }
            }
            #expect(worst <= 1e-6, "\(path): τ = s·B·A off by \(worst)")
        }
    }

    /// W + τ runs like the adapter (LoRA and LoHa), and applying −τ afterwards restores the base model.
    @Test(arguments: ["a", "loha"])
    func applyingTheVectorEqualsRunningTheAdapter(_ name: String) throws {
        let (bert, model) = try Self.model()
        try model.setActiveAdapter(name)
        let adapted = try Self.output(bert)
        let tau = try model.taskVector(name)
        model.setAdaptersDisabled(true)
        let base = try Self.output(bert)
        tau.apply()
        let err = maxAbsDifference(try Self.output(bert), adapted)
        tau.negated.apply()
        let restored = maxAbsDifference(try Self.output(bert), base)
        print("task vector of '\(name)': W + τ vs the adapter \(err), after −τ vs the base \(restored) (adapter effect \(maxAbsDifference(adapted, base)))")
        #expect(err <= 1e-4 && restored <= 1e-4)
        #expect(maxAbsDifference(adapted, base) > 1e-2, "the adapter must change the output")
    }

    @Test func additionNegationAndScalingAreLinear() throws {
        let (_, model) = try Self.model()
        let ta = try model.taskVector("a"), tb = try model.taskVector("b4"), tl = try model.taskVector("loha")
        let mix = try TaskVector.combine([ta, tb, tl], weights: [0.7, -0.3, 2])
        let byPath = { (v: TaskVector) in Dictionary(v.deltas.map { ($0.path, $0.delta) }, uniquingKeysWith: { a, _ in a }) }
        let (a, b, l, m) = (byPath(ta), byPath(tb), byPath(tl), byPath(mix))
        #expect(Set(m.keys) == Set(a.keys).union(b.keys).union(l.keys), "the union of the adapted modules")
        var worst: Float = 0
        for (path, d) in m {
            for i in 0..<d.count {
                let want = 0.7 * (a[path]?.pointer[i] ?? 0) - 0.3 * (b[path]?.pointer[i] ?? 0) + 2 * (l[path]?.pointer[i] ?? 0)
                worst = worse(worst, abs(d.pointer[i] - want))
            }
        }
        #expect(worst <= 1e-6, "Σλτ off by \(worst)")
        #expect(try ta.adding(ta.negated).norm == 0, "τ − τ = 0")
        #expect(abs(ta.scaled(by: -2.5).norm - 2.5 * ta.norm) <= 1e-6 * ta.norm)
        #expect(ta.norm > 0)
    }

    @Test func vectorsWithoutAnExplicitDeltaAreRefused() throws {
        let (_, model) = try Self.model()
        try model.addAdapter("ln", config: try AdapterConfig(jsonText: #"{"peft_type": "LN_TUNING", "target_modules": ["LayerNorm"]}"#, source: "test"))
        do {
            _ = try model.taskVector("ln")
            Issue.record("LN tuning has no Linear weight delta")
        } catch let e as GraftError {
            #expect(e.message.contains("LN_TUNING"), "\(e.message)")
        }
        #expect(throws: GraftError.self) { try TaskVector.combine([try model.taskVector("a")], weights: [1, 2]) }
        #expect(throws: GraftError.self) { try TaskVector.combine([try model.taskVector("a")], weights: [.nan]) }
    }
}
