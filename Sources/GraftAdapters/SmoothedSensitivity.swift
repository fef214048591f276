import GraftTensor

/// AdaLoRA's smoothed sensitivity of every entry of a set of parameters: the importance `|θ · ∇θ|` averaged by an
/// EMA (`beta1`) and its uncertainty `|I − Ī|` by another (`beta2`); an entry's score is their product. Shared by
/// the adaptive-rank methods that rank their parts by it (AdaLoRA, IncreLoRA).
struct SmoothedSensitivity {
    let beta1: Float, beta2: Float
    private var averageImportance: [ObjectIdentifier: [Float]] = [:]
    private var averageUncertainty: [ObjectIdentifier: [Float]] = [:]

    init(beta1: Float, beta2: Float) {
        self.beta1 = beta1
        self.beta2 = beta2
    }

    /// Folds each parameter's current gradient into its averages (parameters without a gradient are skipped).
    mutating func update(_ parameters: [Tensor]) {
        for p in parameters {
            guard let g = p.grad else { continue }
            let id = ObjectIdentifier(p)
            var avg = averageImportance[id] ?? [Float](repeating: 0, count: p.count)
            var unc = averageUncertainty[id] ?? [Float](repeating: 0, count: p.count)
            let pp = p.pointer, gp = g.pointer, b1 = beta1, b2 = beta2
            avg.withUnsafeMutableBufferPointer { a in
                unc.withUnsafeMutableBufferPointer { u in
                    for i in 0..<a.count {
                        let importance = abs(pp[i] * gp[i])
                        a[i] = b1 * a[i] + (1 - b1) * importance
                        u[i] = b2 * u[i] + (1 - b2) * abs(importance - a[i])
                    }
                }
            }
            averageImportance[id] = avg
            averageUncertainty[id] = unc
        }
    }

    /// Each entry's score (zeros before the first update).
    func score(_ p: Tensor) -> [Float] {
        let id = ObjectIdentifier(p)
        guard let a = averageImportance[id], let u = averageUncertainty[id] else { return [Float](repeating: 0, count: p.count) }
        return zip(a, u).map { $0 * $1 }
    }

    /// Forgets every average.
    mutating func reset() {
        averageImportance.removeAll()
        averageUncertainty.removeAll()
    }
}
