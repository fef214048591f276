#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Mean cross entropy of `x · weightᵀ` (an LM head) against `targets`, computed `chunkRows` rows at a time so
/// the `[rows, vocab]` logits are never held in full. Rows whose target is `ignoreIndex` cost nothing.
///
/// When `x` is tracked and `weight` is frozen (LoRA on a decoder), the gradient with respect to `x` is formed
/// chunk by chunk during the forward pass, while each chunk's logits are at hand, and backward only scales it:
/// the head costs two GEMMs, as with stored logits, and `[rows, hidden]` floats instead of `[rows, vocab]`.
/// A trainable `weight` recomputes each chunk's logits in backward instead.
///
/// `x`: `[rows, hidden]` (any leading shape flattened), `weight`: `[vocab, hidden]`, `targets`: `[rows]`.
/// `narrow`, a bfloat16 copy of a frozen `weight`, runs the head's two products in bfloat16 (see ``ComputeDType``).
public func linearCrossEntropy(
    _ x: Tensor, weight: Tensor, narrow: BFloat16Matrix? = nil, targets: [Int32], ignoreIndex: Int32 = -100,
    chunkRows: Int = 128
) -> Tensor {
    precondition(weight.rank == 2, "linearCrossEntropy: weight \(weight.shape) is not a matrix")
    let head: LossHead = weight.requiresGrad ? .dense(weight) : narrow.map { .narrow($0) } ?? .dense(weight)
    return chunkedCrossEntropy(x, head: head, vocab: weight.shape[0], hidden: weight.shape[1],
                               trainableWeight: weight.requiresGrad ? weight : nil, targets: targets,
                               ignoreIndex: ignoreIndex, chunkRows: chunkRows)
}

/// ``linearCrossEntropy(_:weight:narrow:targets:ignoreIndex:chunkRows:)`` for a frozen head kept in a compact
/// format (a GGUF LM head or tied embedding table): each chunk's products decode `weight` a tile of vocabulary rows
/// at a time, so neither the float32 table nor the full logits are ever held. The values multiplied are exactly
/// the dequantized table's, so the loss and the input gradient equal the dense form's up to summation order.
public func linearCrossEntropy(
    _ x: Tensor, frozen weight: any FrozenMatrix, targets: [Int32], ignoreIndex: Int32 = -100, chunkRows: Int = 128
) -> Tensor {
    chunkedCrossEntropy(x, head: .frozen(weight), vocab: weight.rows, hidden: weight.cols, trainableWeight: nil,
                        targets: targets, ignoreIndex: ignoreIndex, chunkRows: chunkRows)
}

/// The LM head a chunked loss multiplies by, `[vocab, hidden]`.
private enum LossHead {
    /// Float32 (possibly trainable).
    case dense(Tensor)
    /// The bfloat16 copy of a frozen head.
    case narrow(BFloat16Matrix)
    /// A frozen head in a compact format, decoded tile by tile.
    case frozen(any FrozenMatrix)

    /// `logits[n, vocab] = x[n, hidden] · Wᵀ`.
    func logits(_ x: UnsafePointer<Float>, rows n: Int, vocab: Int, hidden: Int, into logits: UnsafeMutablePointer<Float>) {
        switch self {
        case .dense(let w):
            sgemm(transA: false, transB: true, m: n, n: vocab, k: hidden, a: x, b: w.pointer, c: logits)
        case .narrow(let w):
            bf16Product(m: n, n: vocab, k: hidden, a: x, b: w, transB: true, c: logits)
        case .frozen(let w):
            let tile = w.tileRows, tiles = (vocab + tile - 1) / tile
            parallelFor(tiles, grain: 1) { range in
                let scratch = TensorBuffer(count: tile * hidden, zeroed: false)
                for t in range {
                    let rows = (t * tile)..<min(vocab, (t + 1) * tile)
                    w.decodeRows(rows, into: scratch.pointer)
                    sgemmSerial(transA: false, transB: true, m: n, n: rows.count, k: hidden, alpha: 1, a: x, lda: hidden,
                                b: scratch.pointer, ldb: hidden, beta: 0, c: logits + rows.lowerBound, ldc: vocab)
                }
            }
        }
    }

    /// `dx[n, hidden] = dLogits[n, vocab] · W`.
    func inputGradient(_ dLogits: UnsafePointer<Float>, rows n: Int, vocab: Int, hidden: Int,
                       into dx: UnsafeMutablePointer<Float>) {
        switch self {
        case .dense(let w):
            sgemm(transA: false, transB: false, m: n, n: hidden, k: vocab, a: dLogits, b: w.pointer, c: dx)
        case .narrow(let w):
            bf16Product(m: n, n: hidden, k: vocab, a: dLogits, b: w, transB: false, c: dx)
        case .frozen(let w):
            // Each thread decodes its own share of the tiles and sums its products; the shares are added at the end.
            let tile = w.tileRows, tiles = (vocab + tile - 1) / tile
            let shares = max(1, min(Threading.threads, tiles)), per = (tiles + shares - 1) / max(shares, 1)
            let partials = TensorBuffer(count: max(shares - 1, 1) * n * hidden, zeroed: false)
            parallelFor(shares, grain: 1) { range in
                let scratch = TensorBuffer(count: tile * hidden, zeroed: false)
                for share in range {
                    let out = share == 0 ? dx : partials.pointer + (share - 1) * n * hidden
                    let first = share * per, last = min(tiles, first + per)
                    if first >= last { out.update(repeating: 0, count: n * hidden) }
                    for t in first..<max(first, last) {
                        let rows = (t * tile)..<min(vocab, (t + 1) * tile)
                        w.decodeRows(rows, into: scratch.pointer)
                        sgemmSerial(transA: false, transB: false, m: n, n: hidden, k: rows.count, alpha: 1,
                                    a: dLogits + rows.lowerBound, lda: vocab, b: scratch.pointer, ldb: hidden,
                                    beta: t == first ? 0 : 1, c: out, ldc: hidden)
                    }
                }
            }
            for share in 1..<max(shares, 1) {
                let src = partials.pointer + (share - 1) * n * hidden
                simdMap2(dx, src, dx, 0..<(n * hidden)) { $0 + $1 }
            }
        }
    }
}

/// The chunked loss over any head; `trainableWeight` is the dense head when it gets a gradient.
private func chunkedCrossEntropy(
    _ x: Tensor, head: LossHead, vocab: Int, hidden: Int, trainableWeight: Tensor?, targets: [Int32],
    ignoreIndex: Int32, chunkRows: Int
) -> Tensor {
    let rowsN = x.rows
    precondition(x.lastDim == hidden && targets.count == rowsN, "linearCrossEntropy: x \(x.shape) head [\(vocab), \(hidden)] targets \(targets.count)")
    let active = (0..<rowsN).filter { targets[$0] != ignoreIndex }
    for r in active { precondition(targets[r] >= 0 && Int(targets[r]) < vocab, "linearCrossEntropy: target \(targets[r]) outside 0..<\(vocab)") }
    let chunk = max(1, min(chunkRows, active.count))
    let count = active.count
    let packed = Tensor(uninitialized: [chunk, hidden])
    let logits = Tensor(uninitialized: [chunk, vocab])
    // Written from parallel chunks: raw storage, never a Swift array (concurrent writes to one are a race).
    let lseStorage = Tensor(zeros: [max(count, 1)])
    let lse = lseStorage.pointer
    var total: Double = 0
    let recording = GradMode.isEnabled && (x.requiresGrad || trainableWeight != nil)
    let eagerInputGradient = recording && x.requiresGrad && trainableWeight == nil
    // Unscaled dL/dx (Σ over a row's (softmax − onehot)·W), filled during forward when eager.
    let eagerDX: Tensor? = eagerInputGradient ? Tensor(zeros: x.shape) : nil
    let dPacked = Tensor(uninitialized: [chunk, hidden])

    func loadChunk(_ start: Int, _ n: Int) {
        for i in 0..<n {
            (packed.pointer + i * hidden).update(from: x.pointer + active[start + i] * hidden, count: hidden)
        }
        head.logits(packed.pointer, rows: n, vocab: vocab, hidden: hidden, into: logits.pointer)
    }
    /// Turns a chunk's logits into (softmax − onehot)·scale in place.
    func logitGradient(_ start: Int, _ n: Int, scale: Float) {
        parallelFor(n, grain: 8) { range in
            for i in range {
                let row = logits.pointer + i * vocab
                _ = expShiftInPlace(row, vocab, shift: lse[start + i])
                scaleProbabilities(row, vocab, by: scale)
                row[Int(targets[active[start + i]])] -= scale
            }
        }
    }
    /// dx rows += dlogits · W for a chunk.
    func scatterInputGradient(_ start: Int, _ n: Int, into dx: Tensor) {
        head.inputGradient(logits.pointer, rows: n, vocab: vocab, hidden: hidden, into: dPacked.pointer)
        for i in 0..<n {
            let dst = dx.pointer + active[start + i] * hidden, src = dPacked.pointer + i * hidden
            for j in 0..<hidden { dst[j] += src[j] }
        }
    }

    var start = 0
    while start < count {
        let n = min(chunk, count - start)
        loadChunk(start, n)
        let partial = UnsafeMutablePointer<Double>.allocate(capacity: n)
        partial.initialize(repeating: 0, count: n)
        defer { partial.deallocate() }
        parallelFor(n, grain: 8) { range in
            for i in range {
                let row = logits.pointer + i * vocab
                let m = rowMax(row, vocab)
                let l = m + Float(log(expShiftSum(row, vocab, shift: m)))
                lse[start + i] = l
                partial[i] = Double(l - row[Int(targets[active[start + i]])])
            }
        }
        for i in 0..<n { total += partial[i] }
        if let eagerDX {
            logitGradient(start, n, scale: 1)
            scatterInputGradient(start, n, into: eagerDX)
        }
        start += n
    }
    let out = Tensor(scalar: count == 0 ? 0 : Float(total / Double(count)))
    guard recording else { return out }
    let xShape = x.shape
    if let eagerDX {
        // Backward only scales what forward formed: nothing else (not the chunk buffers) is kept.
        return Tensor.result(out, inputs: [x]) { g in
            guard count > 0 else { return [Tensor(zeros: xShape)] }
            return [eagerDX * (g.item / Float(count))]
        }
    }
    return Tensor.result(out, inputs: [x] + (trainableWeight.map { [$0] } ?? [])) { g in
        _ = lseStorage
        let dx: Tensor? = x.requiresGrad ? Tensor(zeros: xShape) : nil
        let dw: Tensor? = trainableWeight.map { Tensor(zeros: $0.shape) }
        guard count > 0 else { return [dx, dw] }
        let scale = g.item / Float(count)
        var start = 0
        while start < count {
            let n = min(chunk, count - start)
            loadChunk(start, n)
            logitGradient(start, n, scale: scale)
            if let dx { scatterInputGradient(start, n, into: dx) }
            if let dw {
                sgemm(transA: true, transB: false, m: vocab, n: hidden, k: n, a: logits.pointer, b: packed.pointer,
                      beta: 1, c: dw.pointer)
            }
            start += n
        }
        return [dx, dw]
    }
}
