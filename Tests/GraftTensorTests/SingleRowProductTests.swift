import Testing
import GraftTensor
import GraftTestSupport

/// One-row products (a decoding step, an adapter's rank-r projections) go to GEMV instead of GEMM: every
/// transpose combination, a garbage-filled output with beta 0, and accumulation with beta 1, against a plain
/// triple loop. 300 × 64 is large enough to be split over two threads by output columns (one block of 152, one
/// of 148); 37 × 53 runs as one GEMV.
@Suite struct SingleRowProductTests {
    @Test(arguments: [(false, false), (false, true), (true, false), (true, true)], [(37, 53), (300, 64)])
    func oneRowProductsMatchTheTripleLoop(transposes: (Bool, Bool), size: (Int, Int)) {
        Threading.setThreads(2)
        let (transA, transB) = transposes
        var rng = GraftRNG(seed: 5)
        let (n, k) = size
        let alpha: Float = 0.75
        let a = (0..<k).map { _ in rng.nextNormal() }, b = (0..<(n * k)).map { _ in rng.nextNormal() }
        let start = (0..<n).map { _ in rng.nextNormal() }
        for beta: Float in [0, 1] {
            var c = beta == 0 ? [Float](repeating: .nan, count: n) : start
            // With m = 1, A is [1, k] (lda k) or, transposed, [k, 1] (lda 1); B is [n, k] when transposed, else [k, n].
            sgemm(transA: transA, transB: transB, m: 1, n: n, k: k, alpha: alpha, a: a, lda: transA ? 1 : k, b: b,
                  ldb: transB ? k : n, beta: beta, c: &c, ldc: n)
            for j in 0..<n {
                var expected: Double = 0
                for p in 0..<k { expected += Double(a[p]) * Double(transB ? b[j * k + p] : b[p * n + j]) }
                expected = Double(alpha) * expected + (beta == 0 ? 0 : Double(start[j]))
                #expect(c[j].isFinite && abs(Double(c[j]) - expected) <= 1e-4, "column \(j), beta \(beta): \(c[j]) vs \(expected)")
            }
        }
    }
}
