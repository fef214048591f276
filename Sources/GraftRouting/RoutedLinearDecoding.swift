import CGraftKernels
import GraftAdapters
import GraftModels
import GraftTensor

extension RoutedLinear {
    /// A decoding step of a mixed-adapter batch (a row or two per sequence) whose segments all carry plain LoRA
    /// (``LoRALayer/isFusable``): each row's down projection `h = A x` under its own adapter is a part the base
    /// product's threads share out, and each row's `scaling · h Bᵀ` is added to the output rows each thread
    /// computed, inside the base product's job. Each row is summed by the kernels a layer's own decoding step runs
    /// for it (float32 factors, or in fast mode their int8 copies, A against the input as the base product
    /// quantized it), so a row's values do not depend on the rows beside it or on how the outputs are split. Nil for prefill steps, other methods, and exact-mode steps of
    /// more rows than the block products take (the base product then runs as GEMMs, and the rows' updates as
    /// ``forward(input:baseOutput:layer:)`` shares them out).
    func decodeUpdate(input x: Tensor, layer: Linear) -> DecodingUpdate? {
        let flat = x.rows, inF = layer.inFeatures, outF = layer.outFeatures
        guard batchRows > 0, flat % batchRows == 0, flat / batchRows <= 2, x.lastDim == inF,
              Int8ActivationMode.isEnabled || flat <= directProductRows else { return nil }
        let per = flat / batchRows
        var rows: [RowUpdate] = [], offset = 0
        for segment in segments {
            let loras = segment.adapters.compactMap { $0 as? LoRALayer }
            guard loras.count == segment.adapters.count, loras.allSatisfy(\.isFusable) else { return nil }
            for lora in loras {
                guard lora.rank > 0, lora.loraA.count == lora.rank * inF, lora.loraB.count == outF * lora.rank else {
                    return nil
                }
            }
            // The fast mode's int8 copies are looked up here: the scope that holds them belongs to this thread.
            let int8 = loras.map { lora in lora.decodeInt8Factors.flatMap { $0.out == outF ? $0 : nil } }
            for row in (segment.rows.lowerBound * per)..<(segment.rows.upperBound * per) {
                for (lora, factors) in zip(loras, int8) {
                    rows.append(RowUpdate(row: row, lora: lora, int8: factors, offset: offset))
                    offset += lora.rank
                }
            }
        }
        guard !rows.isEmpty else { return nil }
        return DecodingUpdate(parts: rows.count, work: MixedRowsWork(rows: rows, input: x, hCount: offset))
    }
}

/// The LoRA updates of a mixed-adapter decoding step's rows: part `i` is row update `i`'s down projection, and
/// `apply` adds every row's up projection. In the fast mode, given the input as the base product quantized it, the
/// down projections read those int8 blocks, as a layer's own plan does for a sequence decoding alone
/// (``LoRADecodePlan``), so each row is summed the same way in both.
private final class MixedRowsWork: DecodingWork {
    private let rows: [RowUpdate]
    private let input: Tensor
    private let inF: Int
    /// Every row update's `h`, one after another (`RowUpdate.offset`).
    private let h: UnsafeMutablePointer<Float>

    init(rows: [RowUpdate], input: Tensor, hCount: Int) {
        self.rows = rows
        self.input = input
        inF = input.lastDim
        h = .allocate(capacity: max(hCount, 1))
        h.initialize(repeating: 0, count: max(hCount, 1))
    }

    deinit { h.deallocate() }

    func prepare(_ part: Int) {
        let update = rows[part], lora = update.lora, r = lora.rank
        let x = UnsafePointer(input.pointer) + update.row * inF, hRow = h + update.offset
        if let int8 = update.int8 {
            int8.down(x, inF: inF, rank: r, into: hRow)
        } else {
            cgraft_lora_down(x, Int64(inF), lora.loraA.pointer, Int64(r), hRow)
        }
    }

    func prepare(_ part: Int, quantized q: Int8Rows) {
        let update = rows[part]
        guard let int8 = update.int8, q.cols == inF, update.row < q.rows else { return prepare(part) }
        cgraft_lora_down_q8(q.values + update.row * inF, q.scales + update.row * inF / 32, Int64(inF),
                            int8.a.values, int8.a.scales, Int64(update.lora.rank), h + update.offset)
    }

    func apply(_ range: Range<Int>, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        for update in rows {
            let lora = update.lora, r = lora.rank, hRow = h + update.offset, yRow = y + update.row * ldy
            if let int8 = update.int8 {
                int8.up(hRow, rank: r, rows: range, scale: lora.scaling, into: yRow)
            } else {
                cgraft_lora_up(hRow, Int64(r), lora.loraB.pointer, Int64(range.lowerBound), Int64(range.upperBound),
                               lora.scaling, yRow)
            }
        }
    }
}

/// One row's LoRA update in a mixed-adapter decoding step: its adapter, the int8 copies it reads in fast mode, and
/// where its `h` starts in the step's buffer.
private struct RowUpdate {
    let row: Int
    let lora: LoRALayer
    let int8: LoRALayer.Int8Factors?
    let offset: Int
}
