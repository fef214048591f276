/// The product of `x` (`[..., in]`) with a sparse `[outFeatures, in]` matrix held in coordinate form: entry `k`
/// is `values[k]` at (`rowIndex[k]`, `colIndex[k]`), so `y[b, rowIndex[k]] += values[k] · x[b, colIndex[k]]`.
/// Recorded for autograd; forward and backward cost O(rows of x · entries) and never form the dense matrix or
/// its gradient: ∂L/∂values[k] = Σ_b ∂L/∂y[b, rowIndex[k]] · x[b, colIndex[k]] (the gathered entries of the
/// dense ∂L/∂W), and ∂L/∂x[b, colIndex[k]] += values[k] · ∂L/∂y[b, rowIndex[k]].
///
/// The indices are the caller's to validate (in range, one position per entry). `values` may be longer than the
/// `n` index pairs: the entries past them are inactive (not in the product, zero gradient), which lets a method
/// grow its active set inside a fixed trainable tensor (ID³).
public func sparseLinear(_ x: Tensor, values: Tensor, rowIndex: [Int32], colIndex: [Int32], outFeatures: Int) -> Tensor {
    precondition(values.count >= rowIndex.count && rowIndex.count == colIndex.count, "sparseLinear: index counts")
    let inF = x.lastDim, rowsN = x.rows, n = rowIndex.count
    let out = Tensor(zeros: Array(x.shape.dropLast()) + [outFeatures])
    let px = x.pointer, pv = values.pointer, py = out.pointer
    rowIndex.withUnsafeBufferPointer { ri in
        colIndex.withUnsafeBufferPointer { ci in
            parallelFor(rowsN, grain: max(1, 16_384 / max(n, 1))) { range in
                for b in range {
                    let xb = px + b * inF, yb = py + b * outFeatures
                    for k in 0..<n { yb[Int(ri[k])] += pv[k] * xb[Int(ci[k])] }
                }
            }
        }
    }
    return Tensor.result(out, inputs: [x, values]) { g in
        let pg = g.pointer, px = x.pointer, pv = values.pointer
        var dx: Tensor? = nil, dv: Tensor? = nil
        rowIndex.withUnsafeBufferPointer { ri in
            colIndex.withUnsafeBufferPointer { ci in
                if x.requiresGrad {
                    let d = Tensor(zeros: x.shape)
                    let pd = d.pointer
                    parallelFor(rowsN, grain: max(1, 16_384 / max(n, 1))) { range in
                        for b in range {
                            let gb = pg + b * outFeatures, db = pd + b * inF
                            for k in 0..<n { db[Int(ci[k])] += pv[k] * gb[Int(ri[k])] }
                        }
                    }
                    dx = d
                }
                if values.requiresGrad {
                    let d = Tensor(zeros: values.shape)
                    let pd = d.pointer
                    parallelFor(n, grain: max(1, 16_384 / max(rowsN, 1))) { range in
                        for k in range {
                            let r = Int(ri[k]), c = Int(ci[k])
                            var acc: Float = 0
                            for b in 0..<rowsN { acc += pg[b * outFeatures + r] * px[b * inF + c] }
                            pd[k] = acc
                        }
                    }
                    dv = d
                }
            }
        }
        return [dx, dv]
    }
}

/// Adds `scale · values[k]` to `matrix[rowIndex[k], colIndex[k]]` (`matrix` `[rows, cols]`, row-major) in place,
/// untracked: writes a sparse delta into a dense weight entry by entry, touching nothing else. As in
/// ``sparseLinear(_:values:rowIndex:colIndex:outFeatures:)``, values past the index pairs are inactive.
public func scatterAdd(into matrix: Tensor, values: Tensor, rowIndex: [Int32], colIndex: [Int32], scale: Float = 1) {
    precondition(values.count >= rowIndex.count && rowIndex.count == colIndex.count, "scatterAdd: index counts")
    let cols = matrix.lastDim, pm = matrix.pointer, pv = values.pointer
    for k in 0..<rowIndex.count { pm[Int(rowIndex[k]) * cols + Int(colIndex[k])] += scale * pv[k] }
}
