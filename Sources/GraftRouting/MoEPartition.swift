import Foundation
import GraftTensor

/// The neuron partition of MoEfication: balanced clustering of a feed-forward block's intermediate neurons by
/// co-activation, and the checks and measures around it.
public enum MoEPartition {
    /// Throws unless `partition` is a permutation of `0..<neurons` (names `what` in the message).
    public static func validate(_ partition: [Int32], neurons: Int, what: String) throws {
        guard partition.count == neurons else {
            throw GraftError.invalid("\(what): partition has \(partition.count) entries, expected \(neurons)")
        }
        var seen = [Bool](repeating: false, count: neurons)
        for (i, n) in partition.enumerated() {
            guard n >= 0, Int(n) < neurons, !seen[Int(n)] else {
                throw GraftError.invalid("\(what): partition entry \(i) = \(n) is out of 0..<\(neurons) or repeated")
            }
            seen[Int(n)] = true
        }
    }

    /// Checks the expert spans of an MoE block's `partition` (expert `e` owns the `sizes[e]` entries after those
    /// of the experts before it): `Σ sizes` entries, each ≥ 0, none repeated within an expert. Returns the number
    /// of distinct neurons the experts cover; throws naming `what` and the entry at fault.
    public static func validateSpans(_ partition: [Int32], sizes: [Int], what: String) throws -> Int {
        let total = sizes.reduce(0, +)
        guard partition.count == total else {
            throw GraftError.invalid("\(what): partition has \(partition.count) entries, expected \(total) (the sum of the expert sizes)")
        }
        if let low = partition.min(), low < 0 {
            throw GraftError.invalid("\(what): partition holds the negative neuron index \(low)")
        }
        var covered = Set<Int32>()
        var start = 0
        for (e, size) in sizes.enumerated() {
            var seen = Set<Int32>()
            for i in start..<(start + size) {
                guard seen.insert(partition[i]).inserted else {
                    throw GraftError.invalid("\(what): expert \(e) lists neuron \(partition[i]) twice (partition entry \(i))")
                }
                covered.insert(partition[i])
            }
            start += size
        }
        return covered.count
    }

    /// Balanced spherical k-means: splits `items` row vectors of `profiles` (`[items, dims]`, row-major) into
    /// `clusters` groups of exactly `items / clusters` each, and returns the items grouped by cluster (cluster `c`
    /// owns entries `c·m ..< (c+1)·m`, each group ascending).
    ///
    /// Rows are compared by cosine similarity. Each iteration assigns greedily in order of decreasing
    /// item–centroid similarity, skipping full clusters, then moves every centroid to its members' normalized
    /// mean; it stops when the assignment no longer changes. The initial centroids are `clusters` distinct items
    /// drawn with `seed`, so the result is deterministic given the seed. `items` must be a multiple of `clusters`.
    ///
    /// `capacities` gives each cluster its own size instead (HMoE's heterogeneous experts; they must sum to
    /// `items`), cluster `c` then owning the `capacities[c]` entries after those of the clusters before it.
    public static func balancedKMeans(profiles: Tensor, clusters: Int, iterations: Int, seed: UInt64,
                                      capacities: [Int]? = nil) throws -> [Int32] {
        guard profiles.rank == 2 else { throw GraftError.invalid("profiles must be [items, dims], got \(profiles.shape)") }
        let items = profiles.shape[0], dims = profiles.shape[1]
        let capacity: [Int]
        if let capacities {
            guard capacities.count == clusters, capacities.allSatisfy({ $0 >= 1 }), capacities.reduce(0, +) == items else {
                throw GraftError.invalid("expert sizes \(capacities) must be \(clusters) positive values summing to \(items)")
            }
            capacity = capacities
        } else {
            guard clusters >= 1, items >= clusters, items % clusters == 0 else {
                throw GraftError.invalid("cannot split \(items) neurons into \(clusters) equal experts")
            }
            capacity = [Int](repeating: items / clusters, count: clusters)
        }
        let p = Tensor(zeros: [items, dims])
        p.pointer.update(from: profiles.pointer, count: items * dims)
        for i in 0..<items { normalize(p.pointer + i * dims, count: dims) }
        var rng = GraftRNG(seed: seed)
        var order = Array(0..<items)
        for i in 0..<clusters {
            let j = i + Int(rng.next() % UInt64(items - i))
            order.swapAt(i, j)
        }
        let centroids = Tensor(zeros: [clusters, dims])
        for c in 0..<clusters { (centroids.pointer + c * dims).update(from: p.pointer + order[c] * dims, count: dims) }
        let similarity = Tensor(zeros: [items, clusters]), membership = Tensor(zeros: [clusters, items])
        var assignment = [Int](repeating: -1, count: items)
        for _ in 0..<max(1, iterations) {
            sgemm(transA: false, transB: true, m: items, n: clusters, k: dims, a: p.pointer, b: centroids.pointer, c: similarity.pointer)
            let next = greedyBalancedAssignment(similarity.pointer, items: items, clusters: clusters, capacity: capacity)
            if next == assignment { break }
            assignment = next
            // Centroids = membership [clusters, items] · profiles, then normalized.
            membership.pointer.update(repeating: 0, count: clusters * items)
            for i in 0..<items { membership.pointer[assignment[i] * items + i] = 1 }
            sgemm(transA: false, transB: false, m: clusters, n: dims, k: items, a: membership.pointer, b: p.pointer,
                  c: centroids.pointer)
            for c in 0..<clusters { normalize(centroids.pointer + c * dims, count: dims) }
        }
        var groups = [[Int32]](repeating: [], count: clusters)
        for i in 0..<items { groups[assignment[i]].append(Int32(i)) }
        return groups.flatMap { $0 }
    }

    /// Assigns each item to a cluster in order of decreasing similarity (`[items, clusters]`), at most
    /// `capacity[c]` items to cluster `c`; ties are broken by item, then cluster index.
    static func greedyBalancedAssignment(_ s: UnsafePointer<Float>, items: Int, clusters: Int, capacity: [Int]) -> [Int] {
        var pairs = Array(0..<(items * clusters))
        pairs.sort { a, b in s[a] > s[b] || (s[a] == s[b] && a < b) }
        var assignment = [Int](repeating: -1, count: items)
        var load = [Int](repeating: 0, count: clusters)
        var left = items
        for pair in pairs where left > 0 {
            let i = pair / clusters, c = pair % clusters
            guard assignment[i] < 0, load[c] < capacity[c] else { continue }
            assignment[i] = c
            load[c] += 1
            left -= 1
        }
        return assignment
    }

    /// Scales `count` floats at `p` to unit L2 norm (a zero vector stays zero).
    static func normalize(_ p: UnsafeMutablePointer<Float>, count: Int) {
        let norm = rowDot(p, p, count: count).squareRoot()
        if norm > 0 { scaleRow(p, by: 1 / norm, count: count) }
    }

    /// Over `tokens` tokens, how many of the experts marked in `selected` (`[tokens · experts]`, 1 = selected) are
    /// among the token's `k` most important by `importance` (`[tokens, experts]`).
    public static func topKHits(importance: Tensor, selected: [Float], tokens: Int, experts: Int, k: Int) -> Int {
        var hits = 0
        for t in 0..<tokens {
            let row = UnsafeBufferPointer(start: importance.pointer + t * experts, count: experts)
            for e in RoutePlan.ranking(row).prefix(k) where selected[t * experts + e] != 0 { hits += 1 }
        }
        return hits
    }
}
