import Foundation
import GraftModels
import GraftTensor

/// Settings of ``MoEfication``.
public struct MoEficationOptions: Sendable {
    /// Experts per layer `E` (must divide the intermediate size).
    public var experts = 8
    /// Experts each token runs.
    public var topK = 2
    /// Each expert's neuron count, for heterogeneous experts (HMoE); they must sum to the intermediate size.
    /// nil: `E` equal experts.
    public var expertSizes: [Int]?
    /// Seeds the clustering's initial centroids (layer `i` uses `seed + i`).
    public var seed: UInt64 = 0
    /// Balanced k-means iterations at most.
    public var iterations = 30
    /// Calibration tokens read per layer (the first ones of the sequences).
    public var maxTokens = 2048
    /// The router's ridge penalty, relative to the largest squared singular value of its centred inputs.
    public var ridge: Float = 1e-3
    /// Defaults: 8 experts, top-2, seed 0.
    public init() {}
}

/// What MoEfication measured on one layer.
public struct MoEficationLayerReport: Sendable {
    /// Layer index.
    public var layer: Int
    /// Calibration tokens the partition and router were fitted on.
    public var fitTokens: Int
    /// Held-out calibration tokens (every 10th) the router was checked on.
    public var heldOutTokens: Int
    /// On the held-out tokens, the mean fraction of the true top-k experts the router's top-k holds.
    public var heldOutAgreement: Double
    /// The fraction of the total |activation| the true top-k experts hold (on held-out tokens): the best any
    /// top-k router can keep.
    public var oracleMass: Double
}

/// MoEfication (Zhang et al., 2022): makes an MoE base from a dense decoder. Each layer's SwiGLU intermediate
/// neurons are clustered by co-activation on calibration text into `E` equal experts, and a linear router (the
/// paper's MLP selection, one layer) is fitted to predict each expert's importance for a token, the sum of its
/// neurons' `|silu(gate x) · up x|`; top-k routing then runs only the chosen experts.
///
/// The experts' weights are decoded to float32 once (a layer's FFN: `3 · hidden · intermediate` floats; about
/// 10.6 MB per SmolLM2 layer, 318 MB for its 30 layers), while the dense layers keep their compact weights.
public enum MoEfication {
    /// Runs `sequences` (one at a time, no padding) through the dense decoder and returns each layer's
    /// feed-forward input (the post-attention RMSNorm output) for the first `maxTokens` tokens, `[N, hidden]`.
    public static func collectFeedForwardInputs(model: LlamaModel, sequences: [[Int32]], maxTokens: Int,
                                                progress: (Int) -> Void = { _ in }) throws -> [Tensor] {
        guard maxTokens >= 10 else { throw GraftError.invalid("calibration needs at least 10 tokens, got \(maxTokens)") }
        let captures = model.layers.map { _ in FeedForwardInputCapture(limit: maxTokens, width: model.config.hiddenSize) }
        for (layer, capture) in zip(model.layers, captures) { layer.layerAdapters.append(capture) }
        defer { for layer in model.layers { layer.layerAdapters.removeAll { $0 is FeedForwardInputCapture } } }
        try withNoGrad {
            for seq in sequences where !seq.isEmpty {
                if captures[0].count >= maxTokens { break }
                let before = captures[0].count
                _ = try model.hiddenStates(TokenBatch(sequences: [seq]))
                let now = captures[0].count
                if now / 512 > before / 512 || now >= maxTokens { progress(now) }
            }
        }
        let n = captures[0].count
        guard n >= 10 else { throw GraftError.invalid("calibration text gave \(n) tokens; at least 10 are needed") }
        return captures.map { Tensor(shape: [$0.count, model.config.hiddenSize], values: $0.rows) }
    }

    /// Replaces every layer's dense feed-forward block of `model` by an MoE block made from it, fitted on the
    /// activations of `sequences` through the dense blocks (existing MoE blocks are removed first); returns what
    /// each layer measured. `progress` receives one line per step. On an error the model is left dense.
    @discardableResult
    public static func apply(to model: LlamaModel, sequences: [[Int32]], options: MoEficationOptions,
                             progress: (String) -> Void = { _ in }) throws -> [MoEficationLayerReport] {
        let ff = model.config.intermediateSize
        if let sizes = options.expertSizes {
            guard sizes.count == options.experts, sizes.allSatisfy({ $0 >= 1 }), sizes.reduce(0, +) == ff else {
                throw GraftError.invalid("expert sizes \(sizes) must be \(options.experts) positive values summing to the intermediate size \(ff)")
            }
        } else {
            guard options.experts >= 1, ff % options.experts == 0 else {
                throw GraftError.invalid("experts \(options.experts) must divide the intermediate size \(ff)")
            }
        }
        guard (1...options.experts).contains(options.topK) else {
            throw GraftError.invalid("top_k \(options.topK) must be in 1...\(options.experts)")
        }
        guard options.ridge.isFinite, options.ridge >= 0, options.iterations >= 1 else {
            throw GraftError.invalid("ridge \(options.ridge) must be a finite number ≥ 0 and iterations \(options.iterations) ≥ 1")
        }
        model.removeMoEBlocks()
        let inputs = try collectFeedForwardInputs(model: model, sequences: sequences, maxTokens: options.maxTokens) {
            progress("calibration: \($0) tokens")
        }
        var reports: [MoEficationLayerReport] = [], blocks: [MoEFeedForward] = []
        for (i, layer) in model.layers.enumerated() {
            let (block, report) = try makeBlock(layer: layer, index: i, inputs: inputs[i], options: options)
            blocks.append(block)
            reports.append(report)
            let sizes = options.expertSizes.map { $0.map(String.init).joined(separator: "/") } ?? String(ff / options.experts)
            progress(String(format: "layer %d: %d experts of %@ neurons, held-out top-%d agreement %.3f (random %.3f)",
                            i, options.experts, sizes, options.topK, report.heldOutAgreement,
                            Double(options.topK) / Double(options.experts)))
        }
        // Attached only once every layer succeeded: a failure leaves the model dense.
        try model.checkNoFeedForwardAdapters()
        for (layer, block) in zip(model.layers, blocks) { layer.feedForwardOverride = block }
        return reports
    }

    /// One layer's MoE block: partition of its neurons by co-activation of `inputs` (`[N, hidden]`) and a router
    /// fitted on the other nine tenths of the tokens, checked on every 10th.
    public static func makeBlock(layer: LlamaDecoderLayer, index: Int, inputs x: Tensor,
                                 options: MoEficationOptions) throws -> (MoEFeedForward, MoEficationLayerReport) {
        let a = withNoGrad { swiglu(layer.gateProj.baseForward(x), layer.upProj.baseForward(x)) }
        let tokens = x.rows, ff = a.lastDim, e = options.experts
        let heldOut = (0..<tokens).filter { $0 % 10 == 9 }.map(Int32.init)
        let fit = (0..<tokens).filter { $0 % 10 != 9 }.map(Int32.init)
        // Each neuron's activation profile over the fitted tokens: |A|ᵀ, [ff, fit].
        let profiles = Tensor(zeros: [ff, fit.count])
        for (j, t) in fit.enumerated() {
            let row = a.pointer + Int(t) * ff
            for n in 0..<ff { profiles.pointer[n * fit.count + j] = abs(row[n]) }
        }
        let partition = try MoEPartition.balancedKMeans(profiles: profiles, clusters: e, iterations: options.iterations,
                                                        seed: options.seed &+ UInt64(index), capacities: options.expertSizes)
        let sizes = options.expertSizes ?? [Int](repeating: ff / e, count: e)
        let (gate, up, down) = expertWeights(layer: layer, partition: partition, sizes: sizes)
        let importance = expertImportance(activations: a, partition: partition, sizes: sizes,
                                          neuronNorms: MoEFeedForward.columnNorms(down))
        let (w, b) = try fitRouter(inputs: x, importance: importance, rows: fit, ridge: options.ridge,
                                   what: "model.layers.\(index).mlp router")
        let block = try MoEFeedForward(path: "model.layers.\(index).mlp", partition: partition, gate: gate, up: up,
                                       down: down, routerWeight: w, routerBias: b, topK: options.topK,
                                       expertSizes: options.expertSizes)
        // Held-out check: the router's top-k against the true top-k.
        let xh = gatherTensorRows(x, heldOut), ih = gatherTensorRows(importance, heldOut)
        let logits = withNoGrad { block.routerLogits(xh) }
        var selected = [Float](repeating: 0, count: heldOut.count * e)
        var oracle = 0.0, total = 0.0
        for t in 0..<heldOut.count {
            let row = UnsafeBufferPointer(start: logits.pointer + t * e, count: e)
            for j in RoutePlan.ranking(row).prefix(options.topK) { selected[t * e + j] = 1 }
            let imp = UnsafeBufferPointer(start: ih.pointer + t * e, count: e)
            for j in RoutePlan.ranking(imp).prefix(options.topK) { oracle += Double(imp[j]) }
            total += imp.reduce(0) { $0 + Double($1) }
        }
        let hits = MoEPartition.topKHits(importance: ih, selected: selected, tokens: heldOut.count, experts: e, k: options.topK)
        let report = MoEficationLayerReport(
            layer: index, fitTokens: fit.count, heldOutTokens: heldOut.count,
            heldOutAgreement: heldOut.isEmpty ? 0 : Double(hits) / Double(heldOut.count * options.topK),
            oracleMass: total > 0 ? oracle / total : 0)
        return (block, report)
    }

    /// The experts' float32 weights of `layer`'s dense block under `partition` (expert `e` owning the `sizes[e]`
    /// entries after those of the experts before it): rows of `gate_proj` and `up_proj` (`[E, m, hidden]`) and
    /// columns of `down_proj` (`[E, hidden, m]`), `m` the largest size, smaller experts padded with zeros. Compact
    /// weights are decoded once here.
    public static func expertWeights(layer: LlamaDecoderLayer, partition: [Int32], sizes: [Int]) -> (Tensor, Tensor, Tensor) {
        let gateDense = layer.gateProj.weight, upDense = layer.upProj.weight, downDense = layer.downProj.weight
        let ff = gateDense.shape[0], h = gateDense.shape[1], e = sizes.count, m = sizes.max() ?? 0
        let offsets = spanOffsets(sizes)
        // Each expert's slot list: its neurons, then -1 for padding.
        var slots = [Int32](repeating: -1, count: e * m)
        for ex in 0..<e { for i in 0..<sizes[ex] { slots[ex * m + i] = partition[offsets[ex] + i] } }
        let gate = Tensor(zeros: [e, m, h]), up = Tensor(zeros: [e, m, h]), down = Tensor(zeros: [e, h, m])
        let pg = gateDense.pointer, pu = upDense.pointer, pd = downDense.pointer
        let og = gate.pointer, ou = up.pointer, od = down.pointer
        parallelFor(e) { range in
            for ex in range {
                for i in 0..<m where slots[ex * m + i] >= 0 {
                    let n = Int(slots[ex * m + i])
                    (og + (ex * m + i) * h).update(from: pg + n * h, count: h)
                    (ou + (ex * m + i) * h).update(from: pu + n * h, count: h)
                }
                for r in 0..<h {
                    let src = pd + r * ff, dst = od + (ex * h + r) * m
                    for i in 0..<m where slots[ex * m + i] >= 0 { dst[i] = src[Int(slots[ex * m + i])] }
                }
            }
        }
        return (gate, up, down)
    }

    /// Where each expert's span starts in a partition of experts of `sizes`.
    static func spanOffsets(_ sizes: [Int]) -> [Int] {
        var offsets = [Int](), total = 0
        for s in sizes { offsets.append(total); total += s }
        return offsets
    }

    /// `[T, E]`: per token, the sum over each expert's neurons of `|a|` times the neuron's `down_proj` column
    /// norm (`a`: `[T, intermediate]` in dense order; `neuronNorms` `[E · m]` in expert slot order, `m` the largest
    /// size), as ``MoEFeedForward/expertImportance(_:)`` measures it.
    public static func expertImportance(activations a: Tensor, partition: [Int32], sizes: [Int], neuronNorms: Tensor) -> Tensor {
        let tokens = a.rows, ff = a.lastDim, e = sizes.count, m = sizes.max() ?? 0
        let offsets = spanOffsets(sizes)
        let out = Tensor(zeros: [tokens, e])
        let pa = a.pointer, po = out.pointer, pn = neuronNorms.pointer
        parallelFor(tokens, grain: 64) { range in
            for t in range {
                let row = pa + t * ff
                for ex in 0..<e {
                    var s: Float = 0
                    for i in 0..<sizes[ex] { s += abs(row[Int(partition[offsets[ex] + i])]) * pn[ex * m + i] }
                    po[t * e + ex] = s
                }
            }
        }
        return out
    }

    /// Fits the linear router by ridge regression of each token's centred log importance (`log sₑ` minus its mean
    /// over experts) on the feed-forward input, over `rows` of `inputs`, so `softmax(W x + b)` approximates the
    /// importance shares `sₑ / Σ s`: returns `W` `[E, hidden]`, `b` `[E]`.
    static func fitRouter(inputs x: Tensor, importance: Tensor, rows: [Int32], ridge: Float, what: String) throws -> (Tensor, Tensor) {
        let n = rows.count, h = x.lastDim, e = importance.lastDim
        let xs = gatherTensorRows(x, rows), ys = gatherTensorRows(importance, rows)
        for t in 0..<n {
            let row = ys.pointer + t * e
            var total: Float = 0
            for j in 0..<e { total += row[j] }
            let floor = max(total, .leastNormalMagnitude) * 1e-6
            var mean: Float = 0
            for j in 0..<e {
                row[j] = Foundation.log(row[j] + floor)
                mean += row[j] / Float(e)
            }
            for j in 0..<e { row[j] -= mean }
        }
        let meanX = columnMeans(xs), meanY = columnMeans(ys)
        subtractRowVector(xs, meanX)
        subtractRowVector(ys, meanY)
        // W = V diag(s / (s² + λ)) Uᵀ Y, the ridge solution through the thin SVD of the centred inputs.
        let (u, s, vt) = try svd(xs, what: what)
        let r = s.count
        let lambda = ridge * s.pointer[0] * s.pointer[0]
        let z = Tensor(zeros: [r, e])
        sgemm(transA: true, transB: false, m: r, n: e, k: n, a: u.pointer, b: ys.pointer, c: z.pointer)
        for i in 0..<r {
            let sv = s.pointer[i]
            scaleRow(z.pointer + i * e, by: sv > 0 ? sv / (sv * sv + lambda) : 0, count: e)
        }
        let w = Tensor(zeros: [e, h])
        // Wᵀ = Vᵀᵀ Z, [h, E]; stored as W [E, h] = Zᵀ Vt.
        sgemm(transA: true, transB: false, m: e, n: h, k: r, a: z.pointer, b: vt.pointer, c: w.pointer)
        let b = Tensor(zeros: [e])
        for j in 0..<e { b.pointer[j] = meanY.pointer[j] - rowDot(w.pointer + j * h, meanX.pointer, count: h) }
        return (w, b)
    }
}

/// Records the feed-forward input of one decoder layer during calibration (the first `limit` token rows).
final class FeedForwardInputCapture: LayerAdapter {
    let limit: Int, width: Int
    var rows: [Float] = []
    var count: Int { rows.count / width }
    var isEnabled: Bool { true }

    init(limit: Int, width: Int) {
        self.limit = limit
        self.width = width
    }

    func forward(site: LayerSite, output: Tensor, input: Tensor, mask: AttentionMask) -> Tensor {
        guard site == .feedForward, count < limit else { return output }
        let take = min(limit - count, input.count / width)
        rows.append(contentsOf: UnsafeBufferPointer(start: input.pointer, count: take * width))
        return output
    }
}

/// Rows `rows` of the `[N, width]` tensor `t`, as a new `[rows.count, width]` tensor.
func gatherTensorRows(_ t: Tensor, _ rows: [Int32]) -> Tensor {
    let out = Tensor(zeros: [rows.count, t.lastDim])
    gatherRows(t.pointer, rows, width: t.lastDim, into: out.pointer)
    return out
}

/// The mean of each column of `[N, width]` `t`, `[width]`.
func columnMeans(_ t: Tensor) -> Tensor {
    let n = t.rows, w = t.lastDim
    let ones = Tensor(shape: [1, n], values: [Float](repeating: 1 / Float(max(n, 1)), count: n))
    let out = Tensor(zeros: [w])
    sgemm(transA: false, transB: false, m: 1, n: w, k: n, a: ones.pointer, b: t.pointer, c: out.pointer)
    return out
}

/// Subtracts `v` (`[width]`) from every row of `t` in place.
func subtractRowVector(_ t: Tensor, _ v: Tensor) {
    let w = t.lastDim
    for i in 0..<t.rows {
        let row = t.pointer + i * w
        for j in 0..<w { row[j] -= v.pointer[j] }
    }
}
