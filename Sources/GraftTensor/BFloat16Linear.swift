import CGraftKernels

/// The number format frozen weights are multiplied in.
///
/// `float32` is exact to the fixtures' tolerances and is the default. `bfloat16` keeps a bfloat16 copy of each
/// frozen Linear weight and runs its products (forward, and the input gradient in backward) in bfloat16 with
/// float32 accumulation through oneDNN — about twice the multiply-add rate on CPUs with AVX-512 BF16, at
/// bfloat16's 8-bit mantissa. Trainable weights, adapters, attention and norms stay float32. `auto` is bfloat16
/// where the CPU has AVX-512 BF16 and oneDNN is available, else float32.
public enum ComputeDType: String, Sendable, CaseIterable, Codable {
    /// Exact float32 products.
    case float32
    /// bfloat16 products of frozen weights, float32 accumulation.
    case bfloat16
    /// bfloat16 where the CPU runs it natively, else float32.
    case auto

    /// What `auto` means on this machine; the other cases as they are (bfloat16 falls back to float32 only
    /// when oneDNN is missing).
    public var resolved: ComputeDType {
        switch self {
        case .float32: return .float32
        case .bfloat16: return cgraft_bf16_matmul_available() != 0 ? .bfloat16 : .float32
        case .auto: return cgraft_cpu_has_avx512_bf16() != 0 && cgraft_bf16_matmul_available() != 0 ? .bfloat16 : .float32
        }
    }
}

/// A read-only bfloat16 copy of a `[rows, cols]` float32 matrix (a frozen weight), rounded to nearest even.
public final class BFloat16Matrix: @unchecked Sendable {
    /// Rows (a Linear layer's output width).
    public let rows: Int
    /// Columns (its input width).
    public let cols: Int
    let storage: UnsafeMutablePointer<UInt16>

    /// Rounds `matrix` (2-D) to bfloat16.
    public init(_ matrix: Tensor) {
        rows = matrix.shape[0]
        cols = matrix.count / max(rows, 1)
        storage = .allocate(capacity: max(matrix.count, 1))
        cgraft_f32_to_bf16(matrix.pointer, storage, matrix.count)
    }

    deinit { storage.deallocate() }
}

/// `count` floats at `source` rounded to bfloat16 in a scratch buffer, which `body` uses and which is returned
/// after it. Buffers of 64 KiB and more come from ``BufferPool`` (a step rounds the same activation sizes every
/// time: a fresh mapping each time cost page faults worth ~10 % of a MiniLM training step).
private func withNarrowed<R>(_ source: UnsafePointer<Float>, count: Int,
                             _ body: (UnsafePointer<UInt16>) -> R) -> R {
    let bytes = max(count, 1) * MemoryLayout<UInt16>.stride
    if bytes >= BufferPool.minimumBytes, let block = BufferPool.shared.take(bytes) {
        let buffer = block.pointer.bindMemory(to: UInt16.self, capacity: max(count, 1))
        cgraft_f32_to_bf16(source, buffer, count)
        defer { BufferPool.shared.give(block.pointer, bytes: bytes) }
        return body(buffer)
    }
    let buffer = UnsafeMutablePointer<UInt16>.allocate(capacity: max(count, 1))
    defer { buffer.deallocate() }
    cgraft_f32_to_bf16(source, buffer, count)
    return body(buffer)
}

/// `C[m×n] = A · op(B) (+ C)` for bfloat16 `a` (`[m, k]`) and `b` (`[n, k]` when `transB`, else `[k, n]`), split
/// over Graft's threads the way ``sgemm(transA:transB:m:n:k:alpha:a:lda:b:ldb:beta:c:ldc:parallel:)`` splits:
/// column blocks of C when it is wide enough, else row blocks, each one single-threaded oneDNN call.
private func bf16Product(m: Int, n: Int, k: Int, a: UnsafePointer<UInt16>, b: UnsafePointer<UInt16>, transB: Bool,
                         c: UnsafeMutablePointer<Float>, accumulate: Bool) {
    let ldb = transB ? k : n
    func run(rows: Range<Int>, cols: Range<Int>) {
        let bBlock = transB ? b + cols.lowerBound * ldb : b + cols.lowerBound
        let status = cgraft_bf16_matmul(Int64(rows.count), Int64(cols.count), Int64(k), a + rows.lowerBound * k, Int64(k),
                                        bBlock, Int64(ldb), transB ? 1 : 0, c + rows.lowerBound * n + cols.lowerBound,
                                        Int64(n), accumulate ? 1 : 0)
        // The shapes come from tensors already checked; oneDNN fails only on resource exhaustion.
        precondition(status == 0, "oneDNN bfloat16 matmul failed with status \(status)")
    }
    let threads = Threading.threads
    guard threads > 1, m * n * k >= 1 << 20 else { return run(rows: 0..<m, cols: 0..<n) }
    if n >= 64 * threads {
        let per = ((n + threads - 1) / threads + 15) / 16 * 16
        parallelFor((n + per - 1) / per, grain: 1) { blocks in
            for blk in blocks where blk * per < n { run(rows: 0..<m, cols: (blk * per)..<min(n, (blk + 1) * per)) }
        }
    } else {
        let per = ((m + threads - 1) / threads + 7) / 8 * 8
        parallelFor((m + per - 1) / per, grain: 1) { blocks in
            for blk in blocks where blk * per < m { run(rows: (blk * per)..<min(m, (blk + 1) * per), cols: 0..<n) }
        }
    }
}

/// `C[m×n] = A · op(B)` for float32 `a` (`[m, k]`, rounded to bfloat16 here) and the bfloat16 matrix `b`
/// (`[n, k]` when `transB`, else `[k, n]`).
func bf16Product(m: Int, n: Int, k: Int, a: UnsafePointer<Float>, b: BFloat16Matrix, transB: Bool,
                 c: UnsafeMutablePointer<Float>) {
    withNarrowed(a, count: m * k) { narrowA in
        bf16Product(m: m, n: n, k: k, a: narrowA, b: b.storage, transB: transB, c: c, accumulate: false)
    }
}

/// ``linear(_:_:_:)`` with the frozen `weight`'s products in bfloat16 (`narrow` is its copy): `x · Wᵀ (+ bias)`
/// forward, `dx = dy · W` backward. `weight` must not be trainable (its gradient would need float32).
public func linear(_ x: Tensor, _ weight: Tensor, narrow: BFloat16Matrix, _ bias: Tensor? = nil) -> Tensor {
    precondition(narrow.cols == weight.shape[1] && narrow.rows == weight.shape[0], "linear: bfloat16 copy \(narrow.rows)×\(narrow.cols) vs weight \(weight.shape)")
    precondition(!weight.requiresGrad, "linear(narrow:): the weight is trainable; use the float32 linear")
    return linear(x, narrow: narrow, bias)
}

/// `x · Wᵀ (+ bias)` for a frozen weight known only by its bfloat16 copy `narrow` (`[out, in]`); backward gives
/// the input and bias gradients.
public func linear(_ x: Tensor, narrow: BFloat16Matrix, _ bias: Tensor? = nil) -> Tensor {
    let inF = narrow.cols, outF = narrow.rows
    precondition(x.lastDim == inF, "linear: input \(x.shape) does not end in \(inF)")
    let rowsN = x.rows
    let out = linearOutput(x, inFeatures: inF, outFeatures: outF, bias: bias)
    if inF > 0 {
        withNarrowed(x.pointer, count: x.count) { xb in
            bf16Product(m: rowsN, n: outF, k: inF, a: xb, b: narrow.storage, transB: true, c: out.pointer, accumulate: bias != nil)
        }
    }
    var inputs = [x]
    if let bias { inputs.append(bias) }
    // The input gradient needs the input's shape only, not its values.
    let xShape: [Int]? = x.requiresGrad ? x.shape : nil, biasShape: [Int]? = (bias?.requiresGrad ?? false) ? bias?.shape : nil
    return Tensor.result(out, inputs: inputs) { g in
        var dx: Tensor? = nil
        if let xShape {
            let t = outF > 0 ? Tensor(uninitialized: xShape) : Tensor(zeros: xShape)
            if outF > 0 {
                withNarrowed(g.pointer, count: g.count) { gb in
                    bf16Product(m: rowsN, n: inF, k: outF, a: gb, b: narrow.storage, transB: false, c: t.pointer, accumulate: false)
                }
            }
            dx = t
        }
        return [dx, biasShape.map { g.sumToShape($0) }]
    }
}
