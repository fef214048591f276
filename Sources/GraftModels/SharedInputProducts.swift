import GraftTensor

extension Linear {
    /// Each of `layers` applied to `x`, which they all read (an attention block's q, k and v projections; a gated
    /// feed-forward's gate and up). With gradients off, when every layer keeps a compact weight and each enabled
    /// adapter adds its update inside the base product (``LinearAdapter/decodeUpdate(input:layer:)``, a decoding
    /// step), the products run as one job over all their output rows where ``linearGroup(_:_:)`` applies (the fast
    /// mode, or a decoding step); otherwise, and with the same values either way, each layer's ``forward(_:)``.
    public static func forward(_ x: Tensor, sharedBy layers: [Linear]) -> [Tensor] {
        if layers.count > 1, !GradMode.isEnabled {
            var products: [FrozenProduct] = []
            for layer in layers {
                guard let product = layer.sharedInputProduct(x) else { break }
                products.append(product)
            }
            if products.count == layers.count, let outputs = linearGroup(x, products) { return outputs }
        }
        return layers.map { $0.forward(x) }
    }

    /// This layer's part of a shared-input job: its compact weight and bias, and its enabled adapters' decoding
    /// updates run after each range of output rows; nil when the layer has to run on its own (a float32 or
    /// bfloat16 weight, or an adapter that does not add its update that way).
    private func sharedInputProduct(_ x: Tensor) -> FrozenProduct? {
        guard computeDType != .bfloat16, let matrix = compactWeight, x.lastDim == inFeatures else { return nil }
        var updates: [DecodingUpdate] = []
        for adapter in adapters where adapter.isEnabled {
            guard let update = adapter.decodeUpdate(input: x, layer: self) else { return nil }
            updates.append(update)
        }
        return FrozenProduct(weight: matrix, bias: bias, update: DecodingUpdate.combined(updates))
    }
}
