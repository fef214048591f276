import GraftTensor

/// The three ways PEFT's `add_weighted_adapter` fills one layer of the combined LoRA adapter (each source's
/// scaling `s` is its `lora_alpha/r`, or `lora_alpha/√r` with rsLoRA; the combined adapter's scaling is 1).
extension AdaptedModel {
    /// `cat`: A rows are `w·s·A_t` stacked in source order, B columns the `B_t` side by side, so
    /// `B A = Σ w_t s_t B_t A_t` exactly; ranks add up (a source missing at this layer leaves zero rows).
    static func concatenate(_ parts: [LoRAPart], into target: LoRALayer, path: String) throws {
        let inF = target.loraA.shape[1], outF = target.loraB.shape[0], total = target.rank
        var offset = 0
        for p in parts {
            let r = p.layer.rank
            guard p.layer.loraA.shape[1] == inF, p.layer.loraB.shape[0] == outF, offset + r <= total else {
                throw GraftError.invalid("adapter '\(p.adapter)': \(path) has shape \(p.layer.loraB.shape)·\(p.layer.loraA.shape), which does not fit the combined rank \(total)")
            }
            // PEFT multiplies by the weight, then by the scaling (two float32 roundings).
            let w = Float(p.weight), s = p.layer.scaling
            let a = p.layer.loraA.pointer, dstA = target.loraA.pointer + offset * inF
            for i in 0..<(r * inF) { dstA[i] = (a[i] * w) * s }
            let b = p.layer.loraB.pointer, dstB = target.loraB.pointer
            for row in 0..<outF {
                (dstB + row * total + offset).update(from: b + row * r, count: r)
            }
            offset += r
        }
    }

    /// `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the A's merge with weights
    /// `sign(w s)·√|w s|` and the B's with `√|w s|` (the sign rides on A only, so a negative weight negates
    /// `B A` once), each through the task-vector merge of the type. Ranks must match the combined rank.
    static func combineFactors(_ parts: [LoRAPart], into target: LoRALayer, path: String,
                               merger: inout TaskVectorMerge, rng: inout GraftRNG) throws {
        for p in parts where p.layer.loraA.shape != target.loraA.shape || p.layer.loraB.shape != target.loraB.shape {
            throw GraftError.invalid("adapter '\(p.adapter)': \(path) has rank \(p.layer.rank), the combination needs rank \(target.rank) at every layer (use cat or an svd type)")
        }
        var weightsA: [Float] = [], weightsB: [Float] = []
        for p in parts {
            let ws = p.weight * Double(p.layer.scaling)
            let root = abs(ws).squareRoot()
            weightsA.append(Float(ws >= 0 ? root : -root))
            weightsB.append(Float(root))
        }
        let a = merger.merge(parts.map(\.layer.loraA), weights: weightsA, rng: &rng)
        let b = merger.merge(parts.map(\.layer.loraB), weights: weightsB, rng: &rng)
        target.loraA.pointer.update(from: a.pointer, count: a.count)
        target.loraB.pointer.update(from: b.pointer, count: b.count)
    }

    /// `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the ΔW's (`s·B A`, each
    /// weighted by `w`: PEFT 0.21.2's fixtures show the scaling entering once) merge through the task-vector merge; the
    /// result's truncated SVD `U S Vᵀ` gives `B = U_r S_r`, `A = Vᵀ_r`. With `clamp` both are clamped to
    /// ±(that quantile of their joint entries). With `copaDensity` the ΔW's merge by ``CoPAMerging`` instead.
    static func factorBySVD(_ parts: [LoRAPart], into target: LoRALayer, path: String, rank: Int, clamp: Double?,
                            copaDensity: Double? = nil, merger: inout TaskVectorMerge, rng: inout GraftRNG) throws {
        let inF = target.loraA.shape[1], outF = target.loraB.shape[0]
        guard rank <= min(inF, outF) else {
            throw GraftError.invalid("svd_rank \(rank) exceeds the rank \(min(inF, outF)) a \(outF)×\(inF) delta can have at \(path)")
        }
        var deltas: [Tensor] = [], weights: [Float] = []
        for p in parts {
            let r = p.layer.rank
            guard p.layer.loraA.shape[1] == inF, p.layer.loraB.shape[0] == outF else {
                throw GraftError.invalid("adapter '\(p.adapter)': \(path) has shape \(p.layer.loraB.shape)·\(p.layer.loraA.shape), not \(outF)×\(inF)")
            }
            let d = Tensor(zeros: [outF, inF])
            sgemm(transA: false, transB: false, m: outF, n: inF, k: r, alpha: p.layer.scaling,
                  a: p.layer.loraB.pointer, b: p.layer.loraA.pointer, c: d.pointer)
            deltas.append(d)
            weights.append(Float(p.weight))
        }
        let merged = try copaDensity.map { try CoPAMerging.merge(deltas, weights: weights, density: $0).merged }
            ?? merger.merge(deltas, weights: weights, rng: &rng)
        let (u, s, vt) = try svd(merged, what: "the combined ΔW of \(path)")
        let k = s.count
        let a = target.loraA.pointer, b = target.loraB.pointer
        for row in 0..<outF {
            for j in 0..<rank { b[row * rank + j] = u.pointer[row * k + j] * s.pointer[j] }
        }
        a.update(from: vt.pointer, count: rank * inF)
        if let clamp {
            let hi = quantile(of: [target.loraB, target.loraA], q: clamp)
            for t in [target.loraB, target.loraA] {
                let p = t.pointer
                for i in 0..<t.count { p[i] = min(max(p[i], -hi), hi) }
            }
        }
    }

    /// torch.quantile's default (linear interpolation between the order statistics around `q·(n−1)`) over the
    /// entries of `tensors` taken together.
    static func quantile(of tensors: [Tensor], q: Double) -> Float {
        var values: [Float] = []
        values.reserveCapacity(tensors.reduce(0) { $0 + $1.count })
        for t in tensors { values.append(contentsOf: UnsafeBufferPointer(start: t.pointer, count: t.count)) }
        guard !values.isEmpty else { return 0 }
        values.sort()
        let position = q * Double(values.count - 1)
        let lo = Int(position.rounded(.down)), hi = min(lo + 1, values.count - 1)
        let fraction = Float(position - Double(lo))
        return values[lo] + (values[hi] - values[lo]) * fraction
    }
}
