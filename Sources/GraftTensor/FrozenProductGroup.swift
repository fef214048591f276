/// One product of a group that shares its input: a frozen compact weight, its bias and its decoding-step update
/// (see ``linear(_:frozen:_:update:)``).
public struct FrozenProduct {
    /// `[out, in]`.
    public let weight: any FrozenMatrix
    /// `[out]`, if any.
    public let bias: Tensor?
    /// Prepared on any thread of the job, then applied to each range of output rows after their product on the
    /// thread that computed them.
    public let update: DecodingUpdate?

    /// A product of `weight` (plus `bias`), followed by `update` on each range of output rows.
    public init(weight: any FrozenMatrix, bias: Tensor? = nil, update: DecodingUpdate? = nil) {
        self.weight = weight
        self.bias = bias
        self.update = update
    }

    /// A product of `weight` (plus `bias`), followed by `epilogue` on each range of output rows.
    public init(weight: any FrozenMatrix, bias: Tensor? = nil, epilogue: @escaping OutputRowsUpdate) {
        self.init(weight: weight, bias: bias, update: DecodingUpdate(apply: epilogue))
    }
}

/// `x · Wᵢᵀ (+ bᵢ)` for every product of `products`, which all read the same input `x` (an attention block's q, k
/// and v projections; a gated feed-forward's gate and up), as one job: the output rows of all the products shared
/// out over the threads together, so a small product (k and v of a small model) does not run alone on the calling
/// thread while the others wait, and one dispatch replaces several. Each output value is the one
/// ``linear(_:frozen:_:update:)`` gives for its product alone: both run ``blockProducts(_:_:)``, whose block
/// kernels compute a row the same way whichever range holds it.
///
/// Returns nil, computing nothing, when gradients are on or ``blockProducts(_:_:)`` does not apply; callers then run
/// the products one by one.
public func linearGroup(_ x: Tensor, _ products: [FrozenProduct]) -> [Tensor]? {
    guard !GradMode.isEnabled else { return nil }
    return blockProducts(x, products)
}

/// The products straight from the blocks, no gradient recorded: in the fast mode (``Int8ActivationMode``) with
/// `x` quantized to int8 once, or otherwise for a decoding step of up to ``directProductRows`` rows, the output rows
/// of all `products` shared out over the threads, each range's epilogue run on the thread that computed it. Nil when
/// neither applies to every weight, or when a weight's width differs from `x`'s or a bias from its weight's rows.
func blockProducts(_ x: Tensor, _ products: [FrozenProduct]) -> [Tensor]? {
    let inF = x.lastDim, rowsN = x.rows
    guard inF > 0, rowsN > 0, !products.isEmpty, products.allSatisfy({ $0.weight.cols == inF }),
          products.allSatisfy({ product in product.bias.map { $0.count == product.weight.rows } ?? true })
    else { return nil }
    var int8: Int8Rows? = nil
    if Int8ActivationMode.isEnabled && products.allSatisfy(\.weight.hasInt8Product) {
        // hasInt8Product formats hold whole blocks of 32 per row, so quantizing cannot fail.
        guard let q = try? Int8Rows(x.pointer, rows: rowsN, cols: inF) else { return nil }
        int8 = q
    } else {
        guard rowsN <= directProductRows, products.allSatisfy(\.weight.hasDirectProduct) else { return nil }
    }
    let outputs = products.map { product -> Tensor in
        let out = linearOutput(x, inFeatures: inF, outFeatures: product.weight.rows, bias: product.bias)
        if product.bias == nil { out.pointer.update(repeating: 0, count: rowsN * product.weight.rows) }
        return out
    }
    // Where each product's rows start in the concatenated range the threads share out.
    var starts: [Int] = [], total = 0
    for product in products {
        starts.append(total)
        total += product.weight.rows
    }
    let pointers = outputs.map(\.pointer), xp = UnsafePointer(x.pointer)
    // Waking a second thread costs microseconds: in the fast mode a share below ~128 K weights runs faster on the
    // calling thread alone.
    let grain = int8 == nil ? 64 : max(64, (1 << 17) / max(inF * rowsN, 1))
    // Ranges start at multiples of 16 rows where every product's rows allow it: the int8 kernels' tiles hold 16.
    let unit = products.allSatisfy({ $0.weight.rows % 16 == 0 }) ? 16 : 1
    let prologue = SharedPrologue(products, quantized: int8)
    parallelFor(total / unit, grain: max(1, grain / unit)) { units in
        prologue?.runUnclaimed()
        let range = units.lowerBound * unit..<units.upperBound * unit
        for (index, product) in products.enumerated() {
            let start = starts[index], rows = product.weight.rows
            let lower = max(range.lowerBound, start) - start, upper = min(range.upperBound, start + rows) - start
            guard lower < upper else { continue }
            if let int8 {
                product.weight.accumulateInt8Product(int8, outputRows: lower..<upper, into: pointers[index], ldy: rows)
            } else {
                product.weight.accumulateProduct(xp, rows: rowsN, outputRows: lower..<upper, into: pointers[index],
                                                 ldy: rows)
            }
            if let update = product.update {
                prologue?.finish(product: index)
                update.apply(lower..<upper, pointers[index], rows)
            }
        }
    }
    return outputs
}
