import Foundation
import GraftModels
import GraftTensor

/// AdaMSS (adaptive multi-subspace tuning; PEFT's `tuners/adamss`): the base weight with its bias as an extra
/// column, `[W | b]`, is factored by PyTorch's randomized `svd_lowrank` at rank `r` (seeded by `random_seed`); the
/// rows of its left singular vectors `U` are clustered into `num_subspaces` groups by scikit-learn's K-means; each
/// group `i` of output rows gets its own `Bᵢ Aᵢ`, so
/// `y = W x + b + scatter_i(Bᵢ Aᵢ P [x; 1])` with the frozen projection `P = Vᵀ` (`[r, in + 1]`, saved as
/// `adamss_newB`), `Aᵢ: [rankᵢ, r]` and `Bᵢ: [|groupᵢ|, rankᵢ]` (keys `adamss_A.i`, `adamss_B.i`). PEFT does not save
/// the grouping: it is recomputed from the base weight on load, exactly as PEFT draws it (``torchSVDLowRank``,
/// ``sklearnKMeansLabels``), and a file whose `Bᵢ` shapes disagree is refused. `Aᵢ` starts as the top right
/// singular vectors of `U`'s group rows (exact SVD: PEFT's randomized one draws from PyTorch's unseeded global
/// generator) and `Bᵢ` as zeros. The forward scatters the groups' `Bᵢ Aᵢ` into one `[out, r]` matrix `M` (a row
/// gather) and adds `(P [x; 1]) Mᵀ`: two thin products, never `ΔW`.
public final class AdaMSSLayer: LinearAdapterMethod {
    public let state: AdapterState
    /// `P = Vᵀ` `[r, in (+ 1 with a bias)]`, frozen.
    let projection: Tensor
    /// Per group: `Aᵢ` `[rankᵢ, r]` and `Bᵢ` `[|groupᵢ|, rankᵢ]`, trainable.
    let a: [Tensor], b: [Tensor]
    /// Per group: its output rows, ascending (PEFT's `seg_result`).
    let groups: [[Int]]
    /// For each output row, its position in the groups' concatenation (the inverse of PEFT's `scatter_index`).
    let rowSource: [Int32]
    let inFeatures: Int, outFeatures: Int, hasBias: Bool
    let path: String

    init(base: Linear, rank requested: Int, subspaces: Int, subspaceRank: Int, dynamicRank: Bool, svdThreshold: Double,
         orthogonalInit: Bool, seed: UInt64, state: AdapterState, path: String) throws {
        self.state = state
        self.path = path
        let (inF, outF) = (base.inFeatures, base.outFeatures)
        inFeatures = inF
        outFeatures = outF
        hasBias = base.bias != nil
        let augmented = withNoGrad { base.bias.map { concat([base.weight, $0.reshaped([outF, 1])], dim: 1) } ?? base.weight.detached() }
        let cols = augmented.shape[1]
        let r = min(requested, outF, cols)
        var generator = TorchGenerator(seed: seed)
        let (u, _, v) = try torchSVDLowRank(augmented, q: r, niter: 2, generator: &generator, what: path)
        projection = v.transposed(0, 1).detached()
        let rows = (0..<outF).map { i in (0..<r).map { Double(u.pointer[i * r + $0]) } }
        let k = min(subspaces, outF)
        let labels = sklearnKMeansLabels(rows, clusters: k, maxIter: 10, seed: 123_456_789)
        let count = (labels.max() ?? -1) + 1
        groups = (0..<count).map { c in labels.indices.filter { labels[$0] == c } }
        var aList: [Tensor] = [], bList: [Tensor] = []
        for (index, group) in groups.enumerated() {
            guard !group.isEmpty else {
                throw GraftError(.internalError, "\(path): AdaMSS subspace \(index) of \(count) is empty after clustering")
            }
            let data = Tensor(shape: [group.count, r], values: group.flatMap { i in (0..<r).map { u.pointer[i * r + $0] } })
            let (gu, gs, _) = try svd(data, what: "\(path) subspace \(index)")
            var rankI = min(group.count, subspaceRank)
            if dynamicRank {
                // The Gram matrix's singular values are the squares of the group's.
                let gram = gs.scalars.map { Double($0) * Double($0) }
                let significant = gram.filter { $0 > svdThreshold * (gram.first ?? 0) }.count
                rankI = min(significant, subspaceRank, gram.count)
            }
            rankI = max(1, min(rankI, gu.shape[1]))
            let top = gu.slice(dim: 1, 0..<rankI)
            let q = try qr(matmul(data.transposed(0, 1), top), what: "\(path) subspace \(index)").q  // [r, rankI]
            aList.append(q.transposed(0, 1).detached().requiringGrad())
            let bInit = orthogonalInit ? Tensor(zeros: [group.count, rankI])
                : Tensor.randomNormal([group.count, rankI], std: 0.01, rng: &state.rng)
            bList.append(bInit.requiringGrad())
        }
        a = aList
        b = bList
        var source = [Int32](repeating: 0, count: outF)
        var position: Int32 = 0
        for group in groups {
            for row in group {
                source[row] = position
                position += 1
            }
        }
        rowSource = source
    }

    /// The number of subspaces (groups of output rows).
    public var subspaceCount: Int { groups.count }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        a.enumerated().map { ("adamss_A.\($0.offset)", $0.element) } + b.enumerated().map { ("adamss_B.\($0.offset)", $0.element) }
    }

    public var savedBuffers: [(name: String, tensor: Tensor)] { [("adamss_newB", projection)] }

    public func load(_ name: String, from tensor: Tensor) throws {
        guard let target = namedParameters.first(where: { $0.name == name })?.tensor else {
            throw GraftError.format("\(path): unknown AdaMSS tensor '\(name)' (this layer has \(groups.count) subspaces)")
        }
        guard target.shape == tensor.shape else {
            throw GraftError.format("\(path): AdaMSS tensor '\(name)' has shape \(tensor.shape), the layer expects \(target.shape) (the subspaces are re-clustered from the base weight on load; a different base model or seed gives other groups)")
        }
        target.pointer.update(from: tensor.pointer, count: target.count)
    }

    public func loadBuffer(_ name: String, from tensor: Tensor) throws {
        guard name == "adamss_newB" else { return }
        guard tensor.shape == projection.shape else {
            throw GraftError.format("\(path): 'adamss_newB' has shape \(tensor.shape), the layer expects \(projection.shape)")
        }
        projection.pointer.update(from: tensor.pointer, count: projection.count)
    }

    /// `M` `[out, r]`: each output row's `Bᵢ Aᵢ` row, recorded for autograd.
    func rowMixer() -> Tensor {
        embedding(rowSource, table: concat(zip(b, a).map { matmul($0.0, $0.1) }, dim: 0))
    }

    /// `P` split into its weight part `[r, in]` and its bias column `[r]` (nil without a bias).
    func projectionParts() -> (weight: Tensor, bias: Tensor?) {
        guard hasBias else { return (projection, nil) }
        return (projection.slice(dim: 1, 0..<inFeatures), projection.slice(dim: 1, inFeatures..<(inFeatures + 1)).reshaped([projection.shape[0]]))
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let (pw, pb) = projectionParts()
        let projected = linear(x.reshaped([-1, inFeatures]), pw, pb)
        return y + linear(projected, rowMixer()).reshaped(y.shape)
    }

    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { matmul(rowMixer(), projectionParts().weight) }
    }

    public func deltaBias(base: Linear) -> Tensor? {
        guard let pb = projectionParts().bias else { return nil }
        return withNoGrad { matmul(rowMixer(), pb.reshaped([pb.count, 1])).reshaped([outFeatures]) }
    }
}

/// AdaMSS (`peft_type: "ADAMSS"`): `r`, `num_subspaces`, `subspace_rank`, `init_weights` (`"orthogonal"`: B = 0;
/// null: B ~ N(0, 0.01²) from Graft's generator, PEFT draws from PyTorch's global one), `use_dynamic_rank`,
/// `svd_threshold`, `random_seed`. PEFT's adaptive subspace allocation (`use_asa`, a training callback that masks
/// subspaces by importance) is rejected by name; its schedule keys are inert without it.
public enum AdaMSSFactory: AdapterMethodFactory {
    public static let peftType = "ADAMSS"
    public static let family = "weight-delta (clustered subspaces)"
    public static func exampleConfig(targets: [String]) -> [String: Any] { ["r": 8, "num_subspaces": 5, "target_modules": targets] }

    static func orthogonalInit(_ config: AdapterConfig) throws -> Bool {
        switch config.value("init_weights") {
        case nil: return true
        case is NSNull: return false
        case let text as String where text == "orthogonal": return true
        case let flag as Bool where !flag: return false
        case let other?: throw GraftError.invalid("\(config.source): 'init_weights' must be \"orthogonal\" or null, got \(other)")
        }
    }

    public static func validate(_ config: AdapterConfig) throws {
        for key in ["r", "num_subspaces", "subspace_rank"] {
            let value = try config.int(key, default: key == "r" ? 100 : key == "num_subspaces" ? 5 : 1)
            guard value > 0 else { throw GraftError.invalid("\(config.source): '\(key)' must be positive, got \(value)") }
        }
        _ = try orthogonalInit(config)
        let threshold = try config.double("svd_threshold", default: 0.1)
        guard threshold >= 0, threshold.isFinite else { throw GraftError.invalid("\(config.source): 'svd_threshold' must be ≥ 0, got \(threshold)") }
        let seed = try config.int("random_seed", default: 0)
        guard seed >= 0 else { throw GraftError.invalid("\(config.source): 'random_seed' must be ≥ 0, got \(seed)") }
        if try config.bool("use_asa", default: false) {
            throw GraftError(.unsupported, "\(config.source): 'use_asa' = true is not supported (AdaMSS's adaptive subspace allocation, a training callback masking subspaces by importance, is not implemented; train with use_asa false)")
        }
        // Read only by the rejected ASA schedule.
        config.acknowledge("asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval", "asa_importance_beta",
                           "asa_uncertainty_beta", "asa_schedule_exponent")
        _ = try config.bool("use_dynamic_rank", default: false)
    }

    public static func make(for layer: Linear, path: String, config: AdapterConfig, state: AdapterState,
                            shared: [String: Tensor]) throws -> any LinearAdapterMethod {
        try AdaMSSLayer(base: layer, rank: try config.int("r", default: 100), subspaces: try config.int("num_subspaces", default: 5),
                        subspaceRank: try config.int("subspace_rank", default: 1),
                        dynamicRank: try config.bool("use_dynamic_rank", default: false),
                        svdThreshold: try config.double("svd_threshold", default: 0.1),
                        orthogonalInit: try orthogonalInit(config), seed: UInt64(try config.int("random_seed", default: 0)),
                        state: state, path: "\(config.source): \(path)")
    }
}
