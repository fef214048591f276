import GraftAdapters
import GraftModels
import GraftTensor

/// Runs one batch whose rows use different adapters (one adapter id per row, -1 = base) in a single pass.
///
/// While ``withRouting(_:ids:_:)`` runs its body, every adapted ``GraftModels/Linear`` computes its base
/// projection **once** for the whole batch and then applies each adapter only to the contiguous rows that use
/// it (one set of adapter GEMMs per segment). Rows should be grouped by adapter first (``AdapterBatchPlan``
/// sorts them) so that there is one segment per adapter.
///
/// What mixes: every method attached to Linear layers, because their contract is row-wise — weight-delta
/// methods (LoRA, rsLoRA, DoRA, AdaLoRA, LoHa, LoKr, VeRA, VB-LoRA, MiSS, SHiRA, C3A, RandLoRA, FourierFT),
/// rotations and rescalings of the output (RoAd, IA³) and of the base GEMM's input (IA³ feed-forward, OFT, BOFT, HRA: each
/// segment's input rows are transformed before the one base GEMM), and `modules_to_save` copies of a Linear.
/// Plain LoRA runs a fused kernel (two GEMMs per segment straight into the output rows, segments in
/// parallel); the others run their own `forward` on views of their rows.
///
/// Methods whose output for one sequence depends on the rest of the batch (Lily's batch-averaged router, expert
/// capacity in top-k mixtures: ``GraftModels/LinearAdapter/couplesRows``) run their segment one sequence at a
/// time, so each row still gets what it gets alone.
///
/// Poly / MHR mix with a single task id (or none) set; per-example task ids index positions of the whole batch
/// and throw.
///
/// What does not mix: methods on other modules — prompt tuning, P-tuning and prefix tuning (virtual tokens
/// change the sequence), LN tuning and trainable tokens, aLoRA (its per-token activation belongs to the batch
/// it was computed for) — and merged adapters (their ΔW is in the base
/// weight, so it would reach every row). These throw ``GraftError`` naming the adapter.
///
/// Inference only: the body runs without gradient recording.
public enum MixedAdapterBatch {
    /// Runs `body` (a forward pass over a batch whose row `i` uses adapter `ids[i]`) with per-row routing
    /// installed on `model`'s Linear layers; restores the layers and the adapter switches afterwards.
    ///
    /// `ids` holds one id per row of the batch `body` runs (its row count must equal `ids.count`: a layer
    /// whose row count is not a multiple of it makes this throw) and should be in run order (contiguous per
    /// adapter, see ``AdapterBatchPlan/sortedIds``); unsorted ids still give correct results, with one segment
    /// per run of equal ids.
    public static func withRouting<R>(_ model: AdaptedModel, ids: [Int32], _ body: () throws -> R) throws -> R {
        _ = try AdapterBatchPlan(adapterIds: ids, adapterCount: model.adapters.count)
        try checkMixable(model, ids: ids)
        let segments = AdapterSegment.runs(of: ids)

        // Which named adapter owns each attached Linear adapter.
        var owner: [ObjectIdentifier: Int32] = [:]
        var linears: [ObjectIdentifier: (path: String, linear: Linear)] = [:]
        var linearOrder: [ObjectIdentifier] = []
        for (i, named) in model.adapters.enumerated() {
            for (path, lin, adapter) in named.layers {
                owner[ObjectIdentifier(adapter)] = Int32(i)
                if linears[ObjectIdentifier(lin)] == nil { linears[ObjectIdentifier(lin)] = (path, lin); linearOrder.append(ObjectIdentifier(lin)) }
            }
            for (path, lin, adapter) in named.savedModules {
                owner[ObjectIdentifier(adapter)] = Int32(i)
                if linears[ObjectIdentifier(lin)] == nil { linears[ObjectIdentifier(lin)] = (path, lin); linearOrder.append(ObjectIdentifier(lin)) }
            }
        }
        let used = Set(ids.filter { $0 >= 0 })
        let failure = RoutingFailure()
        var installed: [(Linear, [any LinearAdapter])] = []
        for key in linearOrder {
            guard let (path, lin) = linears[key] else { continue }
            let original = lin.adapters
            // The layer's adapters by owner, in attach order: one lookup per adapter, not one per adapter and segment.
            var byOwner: [Int32: [any LinearAdapter]] = [:]
            for adapter in original {
                if let id = owner[ObjectIdentifier(adapter)] { byOwner[id, default: []].append(adapter) }
            }
            var perSegment: [(rows: Range<Int>, adapters: [any LinearAdapter])] = []
            for seg in segments where seg.adapterId >= 0 {
                guard let list = byOwner[seg.adapterId], !list.isEmpty else { continue }
                // An adapter whose rows depend on each other runs one sequence at a time.
                if list.contains(where: \.couplesRows) {
                    for row in seg.rows { perSegment.append((row..<(row + 1), list)) }
                } else {
                    perSegment.append((seg.rows, list))
                }
            }
            if let stray = original.first(where: { owner[ObjectIdentifier($0)] == nil }) {
                throw GraftError(.unsupported, "layer '\(path)' carries an adapter (\(type(of: stray))) that no named adapter owns; mixed-adapter batches route only adapters added through the model")
            }
            // Layers no routed adapter touches keep their list: every adapter is switched off below.
            guard !perSegment.isEmpty, byOwner.keys.contains(where: used.contains) else { continue }
            installed.append((lin, original))
            lin.adapters = [RoutedLinear(batchRows: ids.count, segments: perSegment, path: path, failure: failure)]
        }
        // X-LoRA adapters run their scaling pass over the batch even though every adapter's switch is off.
        let xloras = used.compactMap { model.adapters[Int($0)].state.methodObjects[XLoRAFactory.runtimeKey] as? XLoRARuntime }
        let wasDisabled = model.adaptersDisabled
        model.setAdaptersDisabled(true)
        for x in xloras { x.routedInMixedBatch = true }
        defer {
            for (lin, original) in installed { lin.adapters = original }
            for x in xloras { x.routedInMixedBatch = false; x.segmentRowOffset = 0 }
            model.setAdaptersDisabled(wasDisabled)
        }
        let result = try withNoGrad { try body() }
        if let message = failure.message { throw GraftError(.internalError, message) }
        return result
    }

    /// Throws unless every adapter `ids` names can be routed per row, and no adapter is merged.
    public static func checkMixable(_ model: AdaptedModel, ids: [Int32]) throws {
        if let merged = model.adapters.first(where: { $0.state.isMerged }) {
            throw GraftError(.state, "per-row adapter ids need unmerged adapters, but '\(merged.name)' is merged; unmerge it first")
        }
        for id in Set(ids).sorted() where id >= 0 {
            let named = model.adapters[Int(id)]
            // Task-routed methods (Poly / MHR, MTLoRA) pick each example's task by its position in the batch; a
            // segment is a different batch.
            if model.methods.linear[named.config.peftType]?.taskCountKey != nil, let tasks = named.state.taskIDs, Set(tasks).count > 1 {
                throw GraftError(.unsupported, "adapter \(id) '\(named.name)' (\(named.config.peftType)) routes by per-example task ids (\(tasks.count) set), which index positions of the whole batch; in a mixed-adapter batch set a single task id (setTaskIDs([id])) or run its rows in a separate batch")
            }
            if named.modules.contains(where: { $0.adapter is ALoRAActivation }) {
                throw GraftError(.unsupported, "adapter \(id) '\(named.name)' (\(named.config.peftType)) is aLoRA (alora_invocation_tokens): it activates per token from its invocation sequence, which mixed-adapter batches do not track — run its rows in a separate batch")
            }
            if let (path, module) = named.modules.first {
                let what = module.mergeable ? "adapts \(path.isEmpty ? "the model" : "'\(path)'") outside Linear layers"
                                            : "adds virtual tokens, which change every sequence's length and attention"
                throw GraftError(.unsupported, "adapter \(id) '\(named.name)' (\(named.config.peftType)) \(what); mixed-adapter batches route Linear-layer methods only (LoRA family, IA³, RoAd, OFT, ...) — run its rows in a separate batch")
            }
        }
    }
}

/// Collects an invariant failure inside a forward pass (where nothing can throw) for ``MixedAdapterBatch`` to
/// report afterwards.
final class RoutingFailure: @unchecked Sendable {
    var message: String?
}

/// Stands in for a Linear layer's adapter list during a mixed batch: transforms each segment's input rows, lets
/// the layer run its base GEMM once, then applies each segment's adapters to that segment's output rows.
final class RoutedLinear: LinearAdapter {
    /// Rows of the token batch (sequences).
    let batchRows: Int
    /// Segments (in batch rows) with the layer's adapters of that segment's named adapter, in attach order.
    let segments: [(rows: Range<Int>, adapters: [any LinearAdapter])]
    let path: String
    let failure: RoutingFailure

    init(batchRows: Int, segments: [(rows: Range<Int>, adapters: [any LinearAdapter])], path: String, failure: RoutingFailure) {
        self.batchRows = batchRows
        self.segments = segments
        self.path = path
        self.failure = failure
    }

    var isEnabled: Bool { true }

    /// Views of rows `rows` (in batch rows) of `t`: `[n, T, features]` when `t` is laid out per batch row,
    /// else `[n·perRow, features]` of the flattened matrix. Nil (and a recorded failure) when `t`'s rows do
    /// not divide into the batch's rows.
    private func view(_ t: Tensor, _ rows: Range<Int>) -> Tensor? {
        if t.rank >= 2 && t.shape[0] == batchRows { return t.rowsView(rows) }
        let flat = t.rows
        guard batchRows > 0, flat % batchRows == 0 else {
            failure.message = "mixed-adapter batch: layer '\(path)' got \(flat) rows, not a multiple of the batch's \(batchRows) rows"
            return nil
        }
        let per = flat / batchRows
        return t.reshaped([flat, t.lastDim]).rowsView((rows.lowerBound * per)..<(rows.upperBound * per))
    }

    func transformInput(_ x: Tensor, layer: Linear) -> Tensor {
        var out: Tensor?
        for seg in segments {
            guard let xv = view(x, seg.rows) else { return x }
            var t = xv
            for a in seg.adapters { t = a.transformInput(t, layer: layer) }
            guard t !== xv else { continue }
            if out == nil { out = x.copy() }
            guard let o = out, let ov = view(o, seg.rows), ov.count == t.count else {
                failure.message = "mixed-adapter batch: layer '\(path)': an input transform changed the shape of its rows"
                return x
            }
            ov.pointer.update(from: t.pointer, count: t.count)
        }
        return out ?? x
    }

    func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        // `y` is the layer's fresh base output for the whole batch: adapters write their rows into it.
        let flat = x.rows
        guard batchRows > 0, flat % batchRows == 0, y.rows == flat else {
            failure.message = "mixed-adapter batch: layer '\(path)' got \(flat) rows, not a multiple of the batch's \(batchRows) rows"
            return y
        }
        let per = flat / batchRows
        // Plain LoRA segments: split into blocks of rows run in parallel, each block's two GEMMs on one thread.
        var tasks: [(rows: Range<Int>, loras: [LoRALayer])] = []
        var general: [(rows: Range<Int>, adapters: [any LinearAdapter])] = []
        // A step of one or two rows per sequence (a decode step) runs its rows two at a time through the per-row
        // kernels (in fast mode, the int8 factors), as each sequence's step alone does. Longer steps (prefills) run
        // GEMMs on blocks of at least three rows, as a prompt alone does: a short last block joins the one before,
        // so no row of a prompt goes through the per-row kernels. Either way a row's update does not depend on how
        // many rows share its adapter.
        let perRow = per <= 2
        let block = perRow ? 2 : max(16, (flat + 2 * Threading.threads - 1) / (2 * Threading.threads))
        for seg in segments {
            let loras = seg.adapters.compactMap { $0 as? LoRALayer }.filter(\.isFusable)
            guard loras.count == seg.adapters.count else { general.append((seg.rows, seg.adapters)); continue }
            var r = seg.rows.lowerBound * per
            let last = seg.rows.upperBound * per
            while r < last {
                var end = min(r + block, last)
                if !perRow && last - end <= 2 { end = last }
                tasks.append((r..<end, loras))
                r = end
            }
        }
        let inF = x.lastDim, outF = y.lastDim
        let px = x.pointer, py = y.pointer
        // Fast-mode int8 factors are looked up here: the scope that holds them belongs to this thread.
        let int8s = tasks.map { task in perRow ? task.loras.map(\.decodeInt8Factors) : [] }
        parallelFor(tasks.count, grain: 1) { range in
            for i in range {
                let rows = tasks[i].rows
                for (k, l) in tasks[i].loras.enumerated() {
                    l.addUpdate(input: px + rows.lowerBound * inF, into: py + rows.lowerBound * outF, rows: rows.count,
                                inFeatures: inF, outFeatures: outF, int8: int8s[i].isEmpty ? nil : int8s[i][k])
                }
            }
        }
        for g in general {
            guard let xv = view(x, g.rows), let yv = view(y, g.rows) else { return y }
            var out = yv
            for a in g.adapters {
                // X-LoRA reads its segment's rows of the scalings the batch's scaling pass computed.
                let xlora = (a as? XLoRALayer)?.runtime
                xlora?.segmentRowOffset = g.rows.lowerBound * per
                out = a.forward(input: xv, baseOutput: out, layer: layer)
                xlora?.segmentRowOffset = 0
            }
            if out.pointer != yv.pointer {
                guard out.count == yv.count else {
                    failure.message = "mixed-adapter batch: layer '\(path)': an adapter changed the shape of its output rows"
                    return y
                }
                yv.pointer.update(from: out.pointer, count: out.count)
            }
        }
        return y
    }
}

extension MixedAdapterBatch {
    /// Generates after each of `prompts` with its own adapter (`adapterIds[i]`, -1 = base) in one batch: the
    /// prompts are grouped by adapter, every prefill and decode step runs the active sequences together with
    /// per-row routing, and the results come back in the caller's order. Each sequence gets the tokens it would
    /// get generating alone under its adapter. `onToken(sequence, token)` (caller's index) returning false
    /// stops that sequence.
    public static func generate(_ model: AdaptedModel, llama: LlamaModel, prompts: [[Int32]], adapterIds: [Int32],
                                parameters: GenerationParameters,
                                onToken: (_ sequence: Int, _ token: Int32) -> Bool = { _, _ in true }) throws -> [[Int32]] {
        guard adapterIds.count == prompts.count else {
            throw GraftError.invalid("\(adapterIds.count) adapter ids for \(prompts.count) prompts")
        }
        let plan = try AdapterBatchPlan(adapterIds: adapterIds, adapterCount: model.adapters.count)
        try checkMixable(model, ids: adapterIds)
        let out = try llama.generate(
            prompts: plan.order.map { prompts[$0] }, parameters: parameters,
            around: { rows, step in try withRouting(model, ids: rows.map { plan.sortedIds[$0] }, step) },
            onToken: { i, token in onToken(plan.order[i], token) })
        var result = [[Int32]](repeating: [], count: prompts.count)
        for (i, r) in plan.order.enumerated() { result[r] = out[i] }
        return result
    }
}
