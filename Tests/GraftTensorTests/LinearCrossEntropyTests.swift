import Foundation
import GraftTestSupport
import Testing
@testable import GraftTensor

/// A frozen matrix kept as float32 rows and "decoded" by copying them: it exercises the tile-by-tile head of
/// ``linearCrossEntropy(_:frozen:targets:ignoreIndex:chunkRows:)`` with exactly known values.
final class RowsMatrix: FrozenMatrix, @unchecked Sendable {
    let rows: Int, cols: Int
    let values: [Float]
    init(rows: Int, cols: Int, values: [Float]) {
        self.rows = rows
        self.cols = cols
        self.values = values
    }
    var residentBytes: Int { values.count * 4 }
    var formatName: String { "F32 rows" }
    func decodeRows(_ range: Range<Int>, into destination: UnsafeMutablePointer<Float>) {
        values.withUnsafeBufferPointer { v in
            guard let base = v.baseAddress else { return }
            destination.update(from: base + range.lowerBound * cols, count: range.count * cols)
        }
    }
}

/// The chunked LM-head loss (dense, and a compact frozen head decoded tile by tile) against a straightforward
/// Float64 computation in the test: full logits, log-softmax, mean over targeted rows, and its gradient
/// `(softmax − onehot) · W / count`.
@Suite struct LinearCrossEntropyTests {
    /// Loss and `dL/dx` of mean cross entropy of `x · wᵀ`, in Float64, holding every logit.
    func reference(x: [Double], w: [Double], rows: Int, hidden: Int, vocab: Int, targets: [Int32]) -> (loss: Double, dx: [Double]) {
        let logits = Ref.linear(x, w, nil, rows: rows, inF: hidden, outF: vocab)
        let probs = Ref.softmax(logits, n: vocab)
        let counted = targets.filter { $0 != -100 }.count
        var dx = [Double](repeating: 0, count: rows * hidden)
        for r in 0..<rows where targets[r] != -100 {
            for v in 0..<vocab {
                let d = (probs[r * vocab + v] - (v == Int(targets[r]) ? 1 : 0)) / Double(counted)
                for k in 0..<hidden { dx[r * hidden + k] += d * w[v * hidden + k] }
            }
        }
        let loss = Ref.crossEntropy(logits, targets: targets.map(Int.init), classes: vocab, ignore: -100)
        return (loss, dx)
    }

    /// Several vocabulary tiles (4096 rows each at this width) shared over the threads, several row chunks, ignored
    /// rows; the loss and the input gradient of both heads match the reference within float32 rounding.
    @Test func compactAndDenseHeadsMatchTheFullLogitsReference() throws {
        let rows = 37, hidden = 64, vocab = 9_000
        let x = randomValues(rows * hidden, seed: 41, scale: 2), w = randomValues(vocab * hidden, seed: 42, scale: 0.5)
        var rng = GraftRNG(seed: 43)
        let targets: [Int32] = (0..<rows).map { r in r % 5 == 3 ? -100 : Int32(rng.next() % UInt64(vocab)) }
        let expected = reference(x: x, w: w, rows: rows, hidden: hidden, vocab: vocab, targets: targets)
        let frozen = RowsMatrix(rows: vocab, cols: hidden, values: w.map(Float.init))
        #expect(frozen.tileRows < vocab, "the test must span several tiles")
        let dense = Tensor(shape: [vocab, hidden], values: w.map(Float.init))
        for chunk in [16, 128] {
            for (label, compact) in [("compact", true), ("dense", false)] {
                let xt = Tensor(shape: [rows, hidden], values: x.map(Float.init)).requiringGrad()
                let loss = compact ? linearCrossEntropy(xt, frozen: frozen, targets: targets, chunkRows: chunk)
                                   : linearCrossEntropy(xt, weight: dense, targets: targets, chunkRows: chunk)
                loss.backward()
                let lossError = abs(Double(loss.item) - expected.loss) / max(1, abs(expected.loss))
                let dx = try #require(xt.grad).scalars.map(Double.init)
                let gradError = maxRelativeError(dx, expected.dx)
                print("linearCrossEntropy \(label) chunk \(chunk): loss \(loss.item) (reference \(expected.loss)), " +
                      "loss error \(lossError), input-gradient error \(gradError)")
                #expect(lossError <= 1e-6, "\(label) chunk \(chunk)")
                #expect(gradError <= 1e-6, "\(label) chunk \(chunk)")
            }
        }
    }

    /// Finite differences of the Float64 reference against the compact head's analytic input gradient, and the
    /// dense head's when only `x` is tracked (the eager path LoRA training takes).
    @Test func inputGradientMatchesFiniteDifferences() {
        let rows = 6, hidden = 8, vocab = 40
        let x = randomValues(rows * hidden, seed: 44, scale: 2), w = randomValues(vocab * hidden, seed: 45)
        let targets: [Int32] = [3, -100, 39, 0, 3, 17]
        let frozen = RowsMatrix(rows: vocab, cols: hidden, values: w.map(Float.init))
        let dense = Tensor(shape: [vocab, hidden], values: w.map(Float.init))
        let reference: ([[Double]]) -> [Double] = { v in
            [Ref.crossEntropy(Ref.linear(v[0], w, nil, rows: rows, inF: hidden, outF: vocab),
                              targets: targets.map(Int.init), classes: vocab, ignore: -100)]
        }
        for chunk in [1, 4, 8] {
            GradientCheck().run("linearCrossEntropy frozen chunk \(chunk)", inputs: [x], shapes: [[rows, hidden]], trainable: [true],
                                op: { linearCrossEntropy($0[0], frozen: frozen, targets: targets, chunkRows: chunk) },
                                reference: reference)
            GradientCheck().run("linearCrossEntropy dense x-only chunk \(chunk)", inputs: [x], shapes: [[rows, hidden]], trainable: [true],
                                op: { linearCrossEntropy($0[0], weight: dense, targets: targets, chunkRows: chunk) },
                                reference: reference)
        }
    }

    /// Every target ignored: zero loss and a zero gradient, not NaN.
    @Test func allRowsIgnored() throws {
        let x = Tensor(shape: [2, 8], values: randomValues(16, seed: 46).map(Float.init)).requiringGrad()
        let frozen = RowsMatrix(rows: 5, cols: 8, values: randomValues(40, seed: 47).map(Float.init))
        let loss = linearCrossEntropy(x, frozen: frozen, targets: [-100, -100])
        #expect(loss.item == 0)
        loss.backward()
        #expect(try #require(x.grad).scalars.allSatisfy { $0 == 0 })
    }
}
