import Foundation
import GraftModels
import GraftTensor

/// LoReFT (Wu et al., 2024, ReFT): at chosen layers and token positions the residual stream is edited in an
/// `r`-dimensional subspace, `h ← h + Rᵀ(W h + b − R h)`. `R ∈ R^{r×d}` keeps orthonormal rows by construction:
/// `Rᵀ = H₀ H₁ ⋯ H_{r−1} [I_r; 0]`, the first `r` columns of a product of Householder reflections
/// `Hᵢ = I − 2v̂ᵢv̂ᵢᵀ` of the free rows `vᵢ` (the QR/Householder parametrization, exact gradients through
/// ordinary ops). `W` starts equal to `R` and `b` at zero, so training starts at the base model. Acts on the
/// layer's output hidden state; not mergeable. Keys per layer: `loreft_rotation` `[r, hidden]` (the `vᵢ`),
/// `loreft_source.weight` `[r, hidden]`, `loreft_source.bias` `[r]`.
public final class LoReFTLayer: ModuleAdapterMethod, LayerAdapter {
    public let state: AdapterState
    /// The Householder vectors `[r, hidden]`.
    public let rotation: Tensor
    /// `W` `[r, hidden]` and `b` `[r]`.
    public let sourceWeight: Tensor, sourceBias: Tensor
    /// Tokens edited at the start and at the end of every sequence (nil first/last count = all tokens).
    public let first: Int, last: Int, allPositions: Bool
    let host: any LayerAdapterHost
    let rank: Int

    init(host: any LayerAdapterHost, rank: Int, first: Int, last: Int, allPositions: Bool, state: AdapterState) throws {
        let d = host.hiddenSize
        guard rank >= 1, rank <= d else { throw GraftError.invalid("r \(rank) must be in 1...\(d) (the hidden size)") }
        self.state = state
        self.host = host
        self.rank = rank
        self.first = first
        self.last = last
        self.allPositions = allPositions
        rotation = Tensor.randomNormal([rank, d], std: 1 / Float(d).squareRoot(), rng: &state.rng).requiringGrad()  // ‖vᵢ‖ ≈ 1
        sourceBias = Tensor(zeros: [rank]).requiringGrad()
        sourceWeight = Tensor(zeros: [rank, d]).requiringGrad()
        let r = withNoGrad { LoReFTLayer.orthonormalRows(rotation, rank: rank) }
        sourceWeight.pointer.update(from: r.pointer, count: r.count)
    }

    /// `R` `[r, d]` with orthonormal rows from the Householder vectors `v` `[r, d]`, recorded.
    static func orthonormalRows(_ v: Tensor, rank: Int) -> Tensor {
        let d = v.shape[1]
        let unit = v * reciprocal(sqrt(matmul(v * v, Tensor(repeating: 1, shape: [d, 1]))))
        var eye = [Float](repeating: 0, count: d * rank)
        for i in 0..<rank { eye[i * rank + i] = 1 }
        var m = Tensor(shape: [d, rank], values: eye)
        for i in stride(from: rank - 1, through: 0, by: -1) {
            let u = unit.slice(dim: 0, i..<(i + 1))  // [1, d]
            m = m - matmul(u, matmul(u, m), transposeA: true) * 2
        }
        return m.transposed(0, 1)
    }

    public var isEnabled: Bool { state.isActive && !state.isMerged }
    public var mergeable: Bool { false }
    public var notMergeableReason: String { "a ReFT intervention edits hidden states at chosen positions, not weights" }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        [("loreft_rotation", rotation), ("loreft_source.weight", sourceWeight), ("loreft_source.bias", sourceBias)]
    }

    public func attach() { host.layerAdapters.append(self) }
    public func detach() { host.layerAdapters.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    public func load(_ name: String, from tensor: Tensor) throws { try loadNamedParameter(name, from: tensor, hint: "r") }

    /// `[rows·length, 1]`: 1 at the edited positions. Positions count within each sequence of the batch (each
    /// packed segment, up to each row's real length); during incremental decoding only absolute positions
    /// `< first` qualify (the last tokens were the prompt's, edited when it was processed).
    func positionMask(rows: Int, length: Int, mask: AttentionMask) -> Tensor {
        var m = [Float](repeating: 0, count: rows * length)
        func mark(_ start: Int, _ end: Int) {
            guard end > start else { return }
            for p in start..<min(end, start + first) { m[p] = 1 }
            for p in max(start, end - last)..<end { m[p] = 1 }
        }
        for row in 0..<rows {
            let base = row * length
            if mask.queryOffset > 0 {
                for j in 0..<length where mask.queryOffset + j < first { m[base + j] = 1 }
                continue
            }
            let real = min(length, mask.keyLengths?[row] ?? length)
            if let segments = mask.segments, segments.count == rows * length {
                var start = 0
                while start < real {
                    var end = start + 1
                    while end < real && segments[base + end] == segments[base + start] { end += 1 }
                    mark(base + start, base + end)
                    start = end
                }
            } else {
                mark(base, base + real)
            }
        }
        return Tensor(shape: [rows * length, 1], values: m)
    }

    public func forward(site: LayerSite, output h: Tensor, input: Tensor, mask: AttentionMask) -> Tensor {
        guard site == .output else { return h }
        let shape = h.shape, d = shape[shape.count - 1]
        let rows = shape.count == 3 ? shape[0] : 1, length = h.count / (rows * d)
        let flat = h.reshaped([rows * length, d])
        let r = LoReFTLayer.orthonormalRows(rotation, rank: rank)
        let edit = linear(linear(flat, sourceWeight, sourceBias) - linear(flat, r), r.transposed(0, 1))
        let edited = allPositions ? edit : edit * positionMask(rows: rows, length: length, mask: mask)
        return (flat + edited).reshaped(shape)
    }
}

/// LoReFT (`peft_type: "LOREFT"`): `r` (4), `layers` (indices; all when absent), `positions` — pyreft's
/// `"f<n>+l<n>"` (first and last `n` tokens, either part optional) or `"all"`; default `"f1+l1"`.
public enum LoReFTFactory: ModuleAdapterFactory {
    public static let peftType = "LOREFT"
    public static let family = "representation (low-rank subspace edit)"
    public static let selectsLayers = true
    public static let mergeable = false
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 4, "positions": "f5+l5"] }

    /// `(first, last, all)` from pyreft's position string.
    static func positions(_ text: String, source: String) throws -> (Int, Int, Bool) {
        if text == "all" { return (0, 0, true) }
        var first = 0, last = 0
        for part in text.split(separator: "+") {
            guard let kind = part.first, kind == "f" || kind == "l", let n = Int(part.dropFirst()), n >= 0 else {
                throw GraftError.invalid("\(source): positions '\(text)' must look like \"f3+l3\", \"f1\", \"l2\" or \"all\"")
            }
            if kind == "f" { first = n } else { last = n }
        }
        guard first + last > 0 else { throw GraftError.invalid("\(source): positions '\(text)' selects no token") }
        return (first, last, false)
    }

    public static func make(for module: Module, path: String, config: AdapterConfig, state: AdapterState) throws -> (any ModuleAdapterMethod)? {
        guard let host = module as? any LayerAdapterHost else { return nil }
        switch config.value("layers") {
        case nil, is NSNull: break
        case let list as [Int]:
            guard let i = layerIndex(path), list.contains(i) else { return nil }
        case let other?: throw GraftError.invalid("\(config.source): 'layers' must be a list of layer indices, got \(other)")
        }
        let (first, last, all) = try positions(try config.string("positions") ?? "f1+l1", source: config.source)
        do {
            return try LoReFTLayer(host: host, rank: try config.int("r", default: 4), first: first, last: last, allPositions: all, state: state)
        } catch let e as GraftError {
            throw GraftError(e.code, "\(config.source): \(path): \(e.message)")
        }
    }
}
