import Foundation
import GraftTensor

/// PyTorch's randomized `torch.svd_lowrank(a, q, niter)` (Halko et al.'s range finder), drawing its Gaussian test
/// matrix `randn(n', q)` from `generator` as PyTorch does from its global generator: for `m < n` the range of `aᵀ`
/// is found (`n' = m`), otherwise that of `a`; `niter` power iterations re-orthonormalise with QR; the small
/// `q × n` projection is factored by LAPACK's SVD. Returns `u: [m, q]`, `s: [q]`, `v: [n, q]` (float32 products
/// as PyTorch's, so subspaces agree to float32 rounding; column signs follow LAPACK's conventions).
func torchSVDLowRank(_ a: Tensor, q: Int, niter: Int, generator: inout TorchGenerator, what: String) throws
    -> (u: Tensor, s: Tensor, v: Tensor) {
    guard a.rank == 2, q >= 1, q <= min(a.shape[0], a.shape[1]) else {
        throw GraftError.invalid("svd_lowrank of \(what): q = \(q) does not fit a \(a.shape) matrix")
    }
    let m = a.shape[0], n = a.shape[1]
    // PyTorch factors the transpose when m < n, to keep the projection small.
    let mat = m < n ? a.transposed(0, 1) : a
    let matT = m < n ? a : a.transposed(0, 1)
    let cols = mat.shape[1]
    let test = Tensor(shape: [cols, q], values: generator.normal(cols * q))
    var basis = try qr(matmul(mat, test), what: what).q
    for _ in 0..<niter {
        basis = try qr(matmul(matT, basis), what: what).q
        basis = try qr(matmul(mat, basis), what: what).q
    }
    let projected = matmul(basis.transposed(0, 1), mat)  // [q, cols]
    let (ub, s, vh) = try svd(projected, what: what)
    let left = matmul(basis, ub), right = vh.transposed(0, 1)
    return m < n ? (right, s, left) : (left, s, right)
}

/// NumPy's legacy `RandomState(seed)`: MT19937 seeded by `init_genrand`, doubles from two 32-bit words
/// (`(a >> 5) · 2²⁶ + (b >> 6)) / 2⁵³`), and `choice(n, size, replace=False, p=…)` as scikit-learn's random
/// K-means initialisation calls it.
struct NumpyRandomState {
    private var mt: TorchRandperm.MT19937

    /// `np.random.RandomState(seed)` for a seed in 0..<2³².
    init(seed: UInt32) {
        mt = TorchRandperm.MT19937(seed: seed)
    }

    /// `random_sample()`: one double in [0, 1).
    mutating func nextDouble() -> Double {
        let a = Double(mt.next() >> 5), b = Double(mt.next() >> 6)
        return (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }

    /// `choice(p.count, size, replace=False, p=p)`: draws `size - found` uniforms per round, maps each through the
    /// renormalised cumulative sum of `p` (already drawn entries zeroed), and keeps new values in the order of
    /// their first appearance.
    mutating func choiceWithoutReplacement(p weights: [Double], size: Int) -> [Int] {
        var p = weights
        var found: [Int] = []
        while found.count < size {
            let draws = (0..<(size - found.count)).map { _ in nextDouble() }
            for f in found { p[f] = 0 }
            var cdf = [Double](repeating: 0, count: p.count)
            var running = 0.0
            for i in p.indices {
                running += p[i]
                cdf[i] = running
            }
            guard let total = cdf.last, total > 0 else { break }
            for i in cdf.indices { cdf[i] /= total }
            var seen = Set<Int>()
            for x in draws {
                // searchsorted(side="right"): the first index whose value exceeds x.
                var lo = 0, hi = cdf.count
                while lo < hi {
                    let mid = (lo + hi) / 2
                    if cdf[mid] <= x { lo = mid + 1 } else { hi = mid }
                }
                let pick = min(lo, cdf.count - 1)
                if seen.insert(pick).inserted { found.append(pick) }
            }
        }
        return found
    }
}

/// scikit-learn's `KMeans(n_clusters: k, init="random", n_init=1, max_iter:, random_state: seed).fit_predict(x)`
/// with Lloyd's algorithm, as AdaMSS clusters the rows of its left singular vectors: the data centred on its column
/// means, initial centres drawn by ``NumpyRandomState/choiceWithoutReplacement(p:size:)`` with uniform weights,
/// each iteration assigning rows to the nearest centre (first on ties) then moving centres to their means (an
/// emptied cluster takes the row farthest from its centre), stopping when labels repeat or the squared centre
/// shift falls to `1e-4 ×` the mean column variance, and a final assignment when stopped by the shift.
/// Computed in double precision; scikit-learn's float32 distances agree except on rows equidistant to rounding.
func sklearnKMeansLabels(_ x: [[Double]], clusters k: Int, maxIter: Int, seed: UInt32) -> [Int] {
    let n = x.count
    guard n > 0, let d = x.first?.count, k > 0 else { return [] }
    var data = x
    var mean = [Double](repeating: 0, count: d)
    for row in data { for j in 0..<d { mean[j] += row[j] } }
    for j in 0..<d { mean[j] /= Double(n) }
    for i in 0..<n { for j in 0..<d { data[i][j] -= mean[j] } }
    var variance = 0.0
    for j in 0..<d { variance += data.reduce(0) { $0 + $1[j] * $1[j] } / Double(n) }
    let tol = variance / Double(d) * 1e-4

    // sample_weight / sample_weight.sum() in float32, widened to double by NumPy's choice.
    let p = [Double](repeating: Double(Float(1) / Float(n)), count: n)
    var rng = NumpyRandomState(seed: seed)
    var centers = rng.choiceWithoutReplacement(p: p, size: k).map { data[$0] }

    func assign(_ centers: [[Double]]) -> [Int] {
        data.map { row in
            var best = 0, bestDistance = Double.infinity
            for (c, center) in centers.enumerated() {
                var dist = 0.0
                for j in 0..<d { dist += (row[j] - center[j]) * (row[j] - center[j]) }
                if dist < bestDistance { bestDistance = dist; best = c }
            }
            return best
        }
    }

    var labels = [Int](repeating: -1, count: n), previous = labels
    var strict = false
    for _ in 0..<maxIter {
        labels = assign(centers)
        var sums = [[Double]](repeating: [Double](repeating: 0, count: d), count: k)
        var weights = [Double](repeating: 0, count: k)
        for (i, c) in labels.enumerated() {
            weights[c] += 1
            for j in 0..<d { sums[c][j] += data[i][j] }
        }
        let empty = (0..<k).filter { weights[$0] == 0 }
        if !empty.isEmpty {
            let distances = (0..<n).map { i in (0..<d).reduce(0.0) { $0 + pow(data[i][$1] - centers[labels[i]][$1], 2) } }
            let far = (0..<n).sorted { distances[$0] > distances[$1] }
            for (e, cluster) in empty.enumerated() where e < far.count {
                let row = far[e], old = labels[row]
                for j in 0..<d { sums[old][j] -= data[row][j]; sums[cluster][j] = data[row][j] }
                weights[cluster] = 1
                weights[old] -= 1
            }
        }
        var shift = 0.0
        for c in 0..<k {
            let updated = weights[c] > 0 ? sums[c].map { $0 / weights[c] } : centers[c]
            for j in 0..<d { shift += (updated[j] - centers[c][j]) * (updated[j] - centers[c][j]) }
            centers[c] = updated
        }
        if labels == previous {
            strict = true
            break
        }
        if shift <= tol { break }
        previous = labels
    }
    if !strict { labels = assign(centers) }
    return labels
}
