import CGraftKernels
import GraftModels
import GraftTensor
import Synchronization

/// What a decoding step of one LoRA layer needs, worked out once per ``Int8FactorCopies`` scope (a generation):
/// the factors (in fast mode their int8 copies), the shapes, the split of the down projection into parts, and a
/// buffer for `h = A x`.
///
/// A decoding step touches every module of the model once per token, and the model's weights stream through the
/// caches in between, so each object a step reads is a likely cache miss: checking the layer's configuration,
/// looking the copies up and allocating `h` cost more per token than the update's arithmetic at rank 16. The plan
/// is one object found through one field, current while its scope is open (a scope never outlives a change to the
/// adapters it serves: see ``Int8FactorCopies``).
final class LoRADecodePlan: DecodingWork, @unchecked Sendable {
    /// The ``Int8FactorCopies/generation`` of the scope the plan belongs to (0: a plan for one step, outside a scope).
    let generation: UInt64
    /// The int8 copies of A and B that fast mode reads; nil in exact mode, which reads `a` and `b`.
    let int8: LoRALayer.Int8Factors?
    /// A `[rank, in]` and B `[out, rank]` in float32, and their values.
    let a: Tensor
    let b: Tensor
    private let aValues: UnsafePointer<Float>
    private let bValues: UnsafePointer<Float>
    let inFeatures: Int
    let outFeatures: Int
    let rank: Int
    let scaling: Float
    /// Rank components per part of the down projection, and parts per input row.
    let width: Int
    let partsPerRow: Int
    /// `h` of up to two rows, `[2, rank]`.
    private let h: UnsafeMutablePointer<Float>
    /// The step's input rows (set by ``update(input:rows:)`` for the step that runs next on this scope's thread).
    private var input: UnsafePointer<Float>?
    private var rows = 0

    init(generation: UInt64, int8: LoRALayer.Int8Factors?, a: Tensor, b: Tensor, inFeatures: Int,
         outFeatures: Int, rank: Int, scaling: Float) {
        self.generation = generation
        self.int8 = int8
        self.a = a
        self.b = b
        aValues = UnsafePointer(a.pointer)
        bValues = UnsafePointer(b.pointer)
        self.inFeatures = inFeatures
        self.outFeatures = outFeatures
        self.rank = rank
        self.scaling = scaling
        // Multiples of four components (the down kernel's row groups), about four parts per row.
        width = max(4, (rank / 4 + 3) / 4 * 4)
        partsPerRow = (rank + width - 1) / width
        h = .allocate(capacity: 2 * rank)
        h.initialize(repeating: 0, count: 2 * rank)
    }

    deinit { h.deallocate() }

    /// The update of a step on `rows` (one or two) rows of `inFeatures` floats at `x`, which stay valid until the
    /// product carrying the update returns.
    func update(input x: UnsafePointer<Float>, rows n: Int) -> DecodingUpdate {
        input = x
        rows = n
        return DecodingUpdate(parts: n * partsPerRow, work: self)
    }

    /// Part `part`: `width` components of `h = A x` for one row.
    func prepare(_ part: Int) {
        guard let x = input else { return }
        let i = part / partsPerRow, k = part % partsPerRow * width, end = min(rank, k + width)
        let row = x + i * inFeatures
        if let int8 {
            int8.down(row, inF: inFeatures, components: k..<end, into: h + i * rank)
        } else {
            cgraft_lora_down(row, Int64(inFeatures), aValues + k * inFeatures, Int64(end - k), h + i * rank + k)
        }
    }

    /// Part `part` in the fast mode from the input as the base product quantized it (int8 per block of 32): A's
    /// int8 rows against those blocks in integer sums, as the base weights are multiplied.
    func prepare(_ part: Int, quantized q: Int8Rows) {
        guard let int8, q.cols == inFeatures, q.rows == rows else { return prepare(part) }
        let i = part / partsPerRow, k = part % partsPerRow * width, end = min(rank, k + width)
        cgraft_lora_down_q8(q.values + i * inFeatures, q.scales + i * inFeatures / 32, Int64(inFeatures),
                            int8.a.values + k * inFeatures, int8.a.scales + k, Int64(end - k), h + i * rank + k)
    }

    /// `y += scaling · B h` over output columns `range` of every row.
    func apply(_ range: Range<Int>, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        for i in 0..<rows {
            if let int8 {
                int8.up(h + i * rank, rank: rank, rows: range, scale: scaling, into: y + i * ldy)
            } else {
                cgraft_lora_up(h + i * rank, Int64(rank), bValues, Int64(range.lowerBound), Int64(range.upperBound),
                               scaling, y + i * ldy)
            }
        }
    }
}

extension LoRALayer {
    /// The plan of a decoding step: inside an ``Int8FactorCopies`` scope open on this thread, the one kept from an
    /// earlier token of the scope, else a new one kept for the rest of it; outside a scope, a new one for this step
    /// only. Fast mode reads the scope's int8 copies (float32 factors where there are none). Nil when the update
    /// cannot be added in place (``isFusable``) or the factors do not fit the layer.
    func decodePlan(inFeatures inF: Int, outFeatures outF: Int) -> LoRADecodePlan? {
        let scope = Int8FactorCopies.current, fast = Int8ActivationMode.isEnabled
        if let generation = scope?.generation, let kept = keptDecodePlan.withLock({ $0 }),
           kept.generation == generation, kept.inFeatures == inF, kept.outFeatures == outF,
           (kept.int8 != nil) == fast {
            return kept
        }
        guard isFusable, rank > 0, loraA.count == rank * inF, loraB.count == outF * rank else { return nil }
        let plan = LoRADecodePlan(generation: scope?.generation ?? 0, int8: fast ? decodeInt8Factors : nil, a: loraA,
                                  b: loraB, inFeatures: inF, outFeatures: outF, rank: rank, scaling: scaling)
        if scope != nil { keptDecodePlan.withLock { $0 = plan } }
        return plan
    }
}
