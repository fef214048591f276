import Foundation
import GraftModels
import GraftTensor

/// Accumulates a layer's input covariance `Σ x̂ᵀx̂` over forward calls, `x̂ = x / |max x|` per call (the
/// normalization PEFT's `preprocess_corda` applies), in Float64.
final class CovarianceCollector {
    let width: Int
    var sum: [Double]
    var calls = 0

    init(width: Int) {
        self.width = width
        sum = [Double](repeating: 0, count: width * width)
    }

    /// Adds one forward call's input `[..., width]`.
    func add(_ x: Tensor) {
        withNoGrad {
            let rows = x.count / width
            guard rows > 0 else { return }
            var peak = -Float.infinity
            for i in 0..<x.count { peak = max(peak, x.pointer[i]) }
            let norm = abs(peak) > 0 && peak.isFinite ? 1 / abs(peak) : 1
            let xs = x.reshaped([rows, width]) * norm
            let c = matmul(xs, xs, transposeA: true)  // [width, width]
            for i in 0..<(width * width) { sum[i] += Double(c.pointer[i]) }
            calls += 1
        }
    }
}

/// CorDA (Yang et al., 2024, context-oriented decomposition adaptation), `init_lora_weights: "corda"` with
/// `corda_config: {"corda_method": "ipm" | "kpm"}` (PEFT's keys; default `"ipm"`).
///
/// The input covariance `C` of each adapted layer is collected from a few batches, damped to
/// `C + λ·mean(diag C)·I` (λ = 0.01, doubled until `C·C⁻¹` is within 0.05 of `I` in Frobenius norm, as PEFT
/// does), and `W·C = U S Vᵀ` is decomposed. The adapter takes `B = U_r (S_r/s)^{1/2}`,
/// `A = (S_r/s)^{1/2} V_rᵀ C⁻¹` from the top-r triplets (`ipm`, instruction-previewed: adapt the
/// task-relevant directions) or the bottom-r (`kpm`, knowledge-preserved: leave the directions the data
/// uses intact); the base keeps the rest, exactly as PiSSA (`PiSSA.swift`, also for saving).
///
/// Like PEFT (which requires `preprocess_corda`), creating the adapter is not enough: until
/// ``AdaptedModel/initializeCorDA(_:run:)`` runs, the layers are default LoRA (B = 0).
extension AdaptedModel {
    /// Collects the input covariance of every layer of the CorDA adapter `name` while `run` executes forward
    /// passes (for example over a few training batches), then initializes A and B from the SVD of `W·C`.
    ///
    /// Throws if the adapter is not a CorDA LoRA, `run` made no forward pass through a layer, or an SVD fails.
    public func initializeCorDA(_ name: String, run: () throws -> Void) throws {
        let a = try adapter(name)
        guard a.config.peftType == LoRAFactory.peftType,
              try SVDInitialization.parse(a.config.value("init_lora_weights"), source: a.config.source) == .corda else {
            throw GraftError.invalid("adapter '\(name)' is not a CorDA LoRA (init_lora_weights \"corda\")")
        }
        guard !a.state.isMerged else { throw GraftError(.state, "adapter '\(name)' is merged; unmerge it before initializing CorDA") }
        let kpm = try CorDAOptions.method(a.config) == "kpm"
        var loras: [(String, Linear, LoRALayer)] = []
        for (path, lin, layer) in a.layers {
            guard let lora = layer as? LoRALayer else { throw GraftError(.internalError, "\(path): CorDA layer is not LoRA") }
            lora.covarianceCollector = CovarianceCollector(width: lin.inFeatures)
            loras.append((path, lin, lora))
        }
        defer { for (_, _, l) in loras { l.covarianceCollector = nil } }
        try withNoGrad { try run() }
        for (path, lin, lora) in loras {
            guard let collector = lora.covarianceCollector, collector.calls > 0 else {
                throw GraftError.invalid("CorDA: no forward pass went through '\(path)' while collecting the covariance")
            }
            try lora.initializeCorDA(base: lin, covariance: collector, kpm: kpm, path: path)
        }
        a.pendingDataInitialization = nil
    }
}

/// Parsing of `corda_config`.
enum CorDAOptions {
    /// `corda_config.corda_method`: `"ipm"` (default) or `"kpm"`.
    static func method(_ config: AdapterConfig) throws -> String {
        guard let raw = config.value("corda_config"), !(raw is NSNull) else { return "ipm" }
        guard let dict = raw as? [String: Any] else {
            throw GraftError.invalid("\(config.source): 'corda_config' must be an object, got \(raw)")
        }
        switch dict["corda_method"] {
        case nil: return "ipm"
        case let m as String where m == "ipm" || m == "kpm": return m
        case let other?: throw GraftError.invalid("\(config.source): corda_config.corda_method must be \"ipm\" or \"kpm\", got \(other)")
        }
    }
}

extension LoRALayer {
    /// CorDA's initialization from a collected covariance (see `AdaptedModel.initializeCorDA`).
    func initializeCorDA(base: Linear, covariance collector: CovarianceCollector, kpm: Bool, path: String) throws {
        let n = base.inFeatures, k = min(base.inFeatures, base.outFeatures)
        guard rank <= k else {
            throw GraftError.invalid("\(path): rank \(rank) exceeds the layer's \(k) singular values (\(base.outFeatures)×\(base.inFeatures))")
        }
        let cov = collector.sum.map { $0 / Double(collector.calls) }
        var meanDiag = 0.0
        for i in 0..<n { meanDiag += cov[i * n + i] }
        meanDiag /= Double(n)
        if !(meanDiag > 0) || !meanDiag.isFinite { meanDiag = 1 }
        var damp = 0.01
        var fixed = Tensor(zeros: [n, n]), inv = Tensor(zeros: [n, n])
        for attempt in 0..<30 {
            fixed = Tensor(shape: [n, n], values: cov.enumerated().map { i, v in Float(i / n == i % n ? v + meanDiag * damp : v) })
            inv = withNoGrad { inverse(fixed) }
            let product = withNoGrad { matmul(fixed, inv) }
            var err = 0.0
            for i in 0..<n {
                for j in 0..<n {
                    let d = Double(product.pointer[i * n + j]) - (i == j ? 1 : 0)
                    err += d * d
                }
            }
            if err.squareRoot() < 0.05 { break }
            guard attempt < 29 else { throw GraftError.invalid("\(path): CorDA covariance stays ill-conditioned after damping") }
            damp *= 2
        }
        let wc = withNoGrad { matmul(base.weight, fixed) }
        let (u, s, vt) = try svd(wc, what: "W·C of '\(path)'")
        let vtInv = withNoGrad { matmul(vt, inv) }  // rows: V_iᵀ C⁻¹
        initializeFromTriplets(u: u, s: s, vt: vtInv, indices: kpm ? Array((k - rank)..<k) : Array(0..<rank))
    }
}
