import Testing
@testable import GraftTensor
import GraftTestSupport

/// The sparse-delta product: forward and both gradients against a naive Float64 coordinate-form reference with
/// central differences, the value gradient against the gathered entries of the dense ∂L/∂W = gᵀ x, and the
/// scatter that writes a delta into a weight.
@Suite struct SparseLinearTests {
    /// Ten distinct positions of a 5×7 matrix, unsorted, with several in one row and one column.
    static let rows: [Int32] = [4, 0, 2, 2, 3, 0, 1, 4, 2, 3]
    static let cols: [Int32] = [6, 0, 3, 1, 3, 5, 2, 0, 6, 4]

    @Test func forwardAndGradientsMatchAFloat64Reference() {
        let (batch, inF, outF, n) = (4, 7, 5, Self.rows.count)
        GradientCheck().run("sparseLinear", inputs: [randomValues(batch * inF, seed: 1), randomValues(n, seed: 2)],
                            shapes: [[2, 2, inF], [n]], trainable: [true, true],
                            op: { sparseLinear($0[0], values: $0[1], rowIndex: Self.rows, colIndex: Self.cols, outFeatures: outF) },
                            reference: { inputs in
            var y = [Double](repeating: 0, count: batch * outF)
            for b in 0..<batch {
                for k in 0..<n { y[b * outF + Int(Self.rows[k])] += inputs[1][k] * inputs[0][b * inF + Int(Self.cols[k])] }
            }
            return y
        })
    }

    /// ∂L/∂values is exactly the dense ∂L/∂W (= gᵀ x for y = x Wᵀ) read at the entries, without forming it.
    @Test func valueGradientIsTheGatheredDenseWeightGradient() {
        var rng = GraftRNG(seed: 3)
        let x = Tensor.randomNormal([6, 7], rng: &rng)
        let g = Tensor.randomNormal([6, 5], rng: &rng)
        let v = Tensor.randomNormal([Self.rows.count], rng: &rng).requiringGrad()
        sum(sparseLinear(x, values: v, rowIndex: Self.rows, colIndex: Self.cols, outFeatures: 5) * g).backward()
        let dense = matmul(g, x, transposeA: true)
        let grad = v.grad?.scalars ?? []
        #expect(grad.count == Self.rows.count)
        for k in 0..<min(grad.count, Self.rows.count) {
            let want = dense.pointer[Int(Self.rows[k]) * 7 + Int(Self.cols[k])]
            #expect(abs(grad[k] - want) <= 1e-5 * max(1, abs(want)), "entry \(k): \(grad[k]) vs \(want)")
        }
    }

    /// Scattering adds each value to exactly its entry (bit for bit: w + v) and leaves every other entry alone.
    @Test func scatterWritesOnlyTheEntries() {
        var rng = GraftRNG(seed: 4)
        let w = Tensor.randomNormal([5, 7], rng: &rng)
        let before = w.scalars
        let v = Tensor.randomNormal([Self.rows.count], rng: &rng)
        scatterAdd(into: w, values: v, rowIndex: Self.rows, colIndex: Self.cols)
        var expected = before
        for k in 0..<Self.rows.count { expected[Int(Self.rows[k]) * 7 + Int(Self.cols[k])] = before[Int(Self.rows[k]) * 7 + Int(Self.cols[k])] + v.pointer[k] }
        #expect(w.scalars == expected)
    }

    /// A NaN value spreads only into the outputs its row feeds (and shows up, rather than being dropped).
    @Test func nanValuesReachTheirRowOnly() {
        let x = Tensor(shape: [1, 7], values: [1, 1, 1, 1, 1, 1, 1])
        let v = Tensor(shape: [Self.rows.count], values: [.nan, 1, 1, 1, 1, 1, 1, 1, 1, 1])
        let y = sparseLinear(x, values: v, rowIndex: Self.rows, colIndex: Self.cols, outFeatures: 5).scalars
        #expect(y[4].isNaN)
        #expect(y[0..<4].allSatisfy { $0.isFinite })
    }
}
