import CGraftKernels
import GraftModels
import GraftTensor

extension LoRALayer {
    /// Plain LoRA (no DoRA magnitude, `lora_bias`, frozen initial factors, KaSA parts, LoftQ error or aLoRA
    /// activation) outside training dropout, with no initialization statistics being gathered: its update can be
    /// added in place by ``addUpdate(input:into:rows:inFeatures:outFeatures:)``.
    public var isFusable: Bool {
        magnitude == nil && loraBias == nil && initialFactors == nil && kasaDiagonal == nil && droppedComponent == nil
            && activation == nil && quantizationError == nil
            && covarianceCollector == nil && momentCollector == nil && gradientCounter == nil
            && !(state.isTraining && dropoutProbability > 0)
    }

    /// Floats of A or B below which a decode step's product stays on the calling thread.
    static let parallelFloats = 8192

    /// Int8 copies of A and B, read instead of the float32 factors by decoding rows (one or two) in fast mode.
    public struct Int8Factors: @unchecked Sendable {
        /// A, `[rank, in]`, a scale per rank component.
        public let a: Int8FactorCopies.Copy
        /// B transposed, `[rank, out]`, a scale per rank component.
        public let bt: Int8FactorCopies.Copy
        /// Output width.
        public let out: Int

        /// `h = A x` for one input row of `inF` floats into `h` (`rank` floats).
        public func down(_ x: UnsafePointer<Float>, inF: Int, rank: Int, into h: UnsafeMutablePointer<Float>) {
            cgraft_lora_down_int8(x, Int64(inF), a.values, a.scales, Int64(rank), h)
        }

        /// Components `components` of `h = A x` for one input row of `inF` floats, into `h + components.lowerBound`.
        public func down(_ x: UnsafePointer<Float>, inF: Int, components: Range<Int>,
                         into h: UnsafeMutablePointer<Float>) {
            let k = components.lowerBound
            cgraft_lora_down_int8(x, Int64(inF), a.values + k * inF, a.scales + k, Int64(components.count), h + k)
        }

        /// `y[o] += scale · (B h)[o]` for `o` in `rows`.
        public func up(_ h: UnsafePointer<Float>, rank: Int, rows: Range<Int>, scale: Float,
                       into y: UnsafeMutablePointer<Float>) {
            cgraft_lora_up_int8(h, Int64(rank), bt.values, bt.scales, Int64(rows.lowerBound), Int64(rows.upperBound),
                                scale, y)
        }
    }

    /// The factors' int8 copies when this thread decodes in fast mode inside an ``Int8FactorCopies`` scope (made
    /// on first use), else nil. Look them up on the thread that runs the step, not on a worker.
    public var decodeInt8Factors: Int8Factors? {
        guard Int8ActivationMode.isEnabled, let copies = Int8FactorCopies.current, rank > 0 else { return nil }
        // A match means the scope is the one open now, so the copies' buffers are alive.
        let generation = copies.generation
        let found = int8FactorsLock.withLock { int8FactorsFound }
        if let found, found.generation == generation { return found.factors }
        guard let a = copies.rows(of: loraA, rows: rank),
              let bt = copies.blockedColumns(of: loraB, rows: loraB.count / rank) else { return nil }
        let factors = Int8Factors(a: a, bt: bt, out: loraB.count / rank)
        int8FactorsLock.withLock { int8FactorsFound = (generation, factors) }
        return factors
    }

    /// Inference: `y += scaling · (x Aᵀ) Bᵀ` straight into the layer's output, no tensors recorded.
    public func addInPlace(input x: Tensor, into y: Tensor, layer: Linear) -> Bool {
        guard isFusable, x.lastDim == layer.inFeatures, y.lastDim == layer.outFeatures, x.rows == y.rows else { return false }
        addUpdate(input: x.pointer, into: y.pointer, rows: x.rows, inFeatures: layer.inFeatures,
                  outFeatures: layer.outFeatures, parallel: true, int8: x.rows <= 2 ? decodeInt8Factors : nil)
        return true
    }

    /// A decoding step: `h = x Aᵀ` in parts of a few rank components each (`[rank, in]`, a few tens of KB), which
    /// the base product's threads share out, and `scaling · h Bᵀ` into whichever output rows they hand over
    /// (``LoRADecodePlan``). In fast mode, inside an ``Int8FactorCopies`` scope, A and B are read from int8 copies:
    /// a quarter of the bytes per token. Each component of `h` is the same sum however the parts fall.
    public func decodeUpdate(input x: Tensor, layer: Linear) -> DecodingUpdate? {
        let n = x.rows, inF = layer.inFeatures, r = rank
        guard n <= 2, r > 0, x.lastDim == inF else { return nil }
        return decodePlan(inFeatures: inF, outFeatures: layer.outFeatures)?.update(input: x.pointer, rows: n)
    }

    /// `y += scaling · (x Aᵀ) Bᵀ` for `rows` rows, written straight into `y`'s memory (no-grad inference). A row
    /// or two (a decode step) takes two matrix-vector products per row on the calling thread, which cost less
    /// than setting up GEMMs; more rows run two GEMMs, shared out over Graft's threads when `parallel`. `int8`
    /// (``decodeInt8Factors``) has a row or two read int8 factors instead.
    public func addUpdate(input x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, rows n: Int,
                          inFeatures inF: Int, outFeatures outF: Int, parallel: Bool = false,
                          int8: Int8Factors? = nil) {
        let r = rank
        guard n > 0, r > 0 else { return }
        withUnsafeTemporaryAllocation(of: Float.self, capacity: n * r) { buffer in
            guard let h = buffer.baseAddress else { return }
            if n <= 2, let int8, int8.out == outF {
                let s = scaling, grain = parallel ? max(32, Self.parallelFloats / r) : outF
                for i in 0..<n {
                    let hi = h + i * r, yi = y + i * outF
                    int8.down(x + i * inF, inF: inF, rank: r, into: hi)
                    parallelFor(outF, grain: grain) { o in int8.up(hi, rank: r, rows: o, scale: s, into: yi) }
                }
                return
            }
            if n <= 2 && !parallel {
                // One thread (a row of a mixed-adapter batch): the decode kernels, no BLAS call overhead.
                let a = loraA.pointer, b = loraB.pointer
                for i in 0..<n {
                    cgraft_lora_down(x + i * inF, Int64(inF), a, Int64(r), h + i * r)
                    cgraft_lora_up(h + i * r, Int64(r), b, 0, Int64(outF), scaling, y + i * outF)
                }
                return
            }
            if n <= 2 {
                // Decoding streams A and B once per token: rows of each are shared out over the threads when they
                // hold more than ~32 KB (smaller ones cost less than waking a thread).
                let a = loraA.pointer, b = loraB.pointer, s = scaling
                let grainA = parallel ? max(1, Self.parallelFloats / max(inF, 1)) : r
                let grainB = parallel ? max(8, Self.parallelFloats / r) : outF
                for i in 0..<n {
                    let xi = x + i * inF, hi = h + i * r, yi = y + i * outF
                    parallelFor(r, grain: grainA) { k in
                        sgemv(m: k.count, n: inF, a: a + k.lowerBound * inF, x: xi, y: hi + k.lowerBound)
                    }
                    parallelFor(outF, grain: grainB) { o in
                        sgemv(m: o.count, n: r, alpha: s, a: b + o.lowerBound * r, x: UnsafePointer(hi), beta: 1,
                              y: yi + o.lowerBound)
                    }
                }
                return
            }
            sgemm(transA: false, transB: true, m: n, n: r, k: inF, a: x, b: loraA.pointer, c: h, parallel: parallel)
            sgemm(transA: false, transB: true, m: n, n: outF, k: r, alpha: scaling, a: h, b: loraB.pointer, beta: 1,
                  c: y, parallel: parallel)
        }
    }
}
