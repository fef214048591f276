import GraftTensor

/// Sums trainable parameters' gradients over a ``ProcessGroup`` in a few large flat buffers (buckets), one
/// allreduce per bucket instead of one per tensor: adapters have hundreds of small tensors, and per-call latency
/// would dominate.
///
/// A parameter without a gradient on every member keeps none (optimizers skip those, and a zero gradient would
/// still move AdamW's moments); one member's missing gradient counts as zeros. Each bucket carries one presence
/// flag per parameter for that.
public enum GradientAllreduce {
    /// Floats per bucket (16 MB): few calls even for SmolLM2's all-linear r16 (about 5M parameters).
    public static let defaultBucketElements = 4 << 20

    /// Replaces each parameter's gradient with its sum over `group` (a no-op for one process).
    public static func sum(_ parameters: [Tensor], group: any ProcessGroup,
                           bucketElements: Int = defaultBucketElements) throws {
        guard group.size > 1, !parameters.isEmpty else { return }
        var start = 0
        while start < parameters.count {
            var end = start
            var elements = 0
            while end < parameters.count && (end == start || elements + parameters[end].count <= bucketElements) {
                elements += parameters[end].count
                end += 1
            }
            try reduceBucket(parameters[start..<end], elements: elements, group: group)
            start = end
        }
    }

    private static func reduceBucket(_ bucket: ArraySlice<Tensor>, elements: Int, group: any ProcessGroup) throws {
        var flat = [Float](repeating: 0, count: elements + bucket.count)
        try flat.withUnsafeMutableBufferPointer { buffer in
            guard let base = buffer.baseAddress else { return }
            var offset = 0
            for (i, p) in bucket.enumerated() {
                if let g = p.grad {
                    base.advanced(by: offset).update(from: g.pointer, count: min(g.count, p.count))
                    base[elements + i] = 1
                }
                offset += p.count
            }
            try group.allreduceSum(buffer)
            offset = 0
            for (i, p) in bucket.enumerated() {
                defer { offset += p.count }
                guard base[elements + i] > 0 else { p.grad = nil; continue }
                let g: Tensor
                if let existing = p.grad, existing.count == p.count {
                    g = existing
                } else {
                    g = Tensor(zeros: p.shape)
                    p.grad = g
                }
                g.pointer.update(from: base.advanced(by: offset), count: p.count)
            }
        }
    }
}
