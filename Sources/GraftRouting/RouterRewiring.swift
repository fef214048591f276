import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Test-time router rewiring (seed #100, "Rewiring Experts on the Fly"): additive vectors on the router logits of
/// selected MoE layers, optimized at inference on the context alone, with no weight of the model changed.
///
/// Layer `l`'s router scores become `logits_l(x) + δ_l` (``MoEFeedForward/logitOffset``, `δ_l ∈ R^E`, shared by
/// every token). ``adapt(model:context:steps:learningRate:)`` minimizes the next-token cross-entropy of the
/// context over the `δ` (Adam, a few steps; self-supervision, no external data), after which generation runs with
/// the rewired routers. The paper re-adapts at intervals during generation; ``generate(model:prompt:parameters:steps:learningRate:)``
/// adapts once, on the prompt (the prefill phase). The gradient reaches `δ` only through routing weights that
/// depend on the router, so the rewired blocks must combine by probability (``MoECombine/probability``).
public final class RouterRewiring {
    /// The rewired decoder layers, ascending.
    public let layers: [Int]
    /// Per rewired layer (in ``layers`` order), its logit offset `δ` `[E]`.
    public let offsets: [Tensor]
    private let blocks: [MoEFeedForward]
    private var moments: [(m: [Float], v: [Float])]
    private var steps = 0

    /// Zero offsets for `layers` of `model` (all its MoE layers when nil); throws naming a layer without an MoE
    /// block, a repeated or out-of-range layer, or a block whose experts are summed (its router gets no gradient).
    public init(model: LlamaModel, layers: [Int]? = nil) throws {
        let chosen = layers ?? Array(model.layers.indices)
        guard !chosen.isEmpty, Set(chosen).count == chosen.count else {
            throw GraftError.invalid("router rewiring: layers \(chosen) must be non-empty and distinct")
        }
        var blocks: [MoEFeedForward] = []
        for l in chosen.sorted() {
            guard model.layers.indices.contains(l), let b = model.layers[l].feedForwardOverride as? MoEFeedForward else {
                throw GraftError.invalid("router rewiring: layer \(l) has no MoE block (the model has \(model.layers.count) layers, \(model.moeBlocks.count) MoE blocks)")
            }
            guard b.combine == .probability else {
                throw GraftError.invalid("router rewiring: layer \(l)'s MoE block has combine '\(b.combine.rawValue)', whose output does not depend on the router's scores; set combine 'probability'")
            }
            blocks.append(b)
        }
        self.layers = chosen.sorted()
        self.blocks = blocks
        offsets = blocks.map { Tensor(zeros: [$0.experts]) }
        moments = blocks.map { (m: [Float](repeating: 0, count: $0.experts), v: [Float](repeating: 0, count: $0.experts)) }
    }

    /// Adds the offsets to their blocks' router logits.
    public func install() { for (b, o) in zip(blocks, offsets) { b.logitOffset = o } }

    /// Takes the offsets off their blocks (the routers are the model's own again).
    public func remove() { for (b, o) in zip(blocks, offsets) where b.logitOffset === o { b.logitOffset = nil } }

    /// Sets every offset back to zero and forgets the optimizer's state (a new context).
    public func reset() {
        for o in offsets { o.pointer.update(repeating: 0, count: o.count) }
        moments = blocks.map { (m: [Float](repeating: 0, count: $0.experts), v: [Float](repeating: 0, count: $0.experts)) }
        steps = 0
    }

    /// The mean next-token cross-entropy of `model` on `ids` (one sequence), recorded for autograd.
    public static func contextLoss(model: LlamaModel, ids: [Int32]) throws -> Tensor {
        guard ids.count >= 2 else { throw GraftError.invalid("router rewiring: the context has \(ids.count) tokens; it needs at least 2") }
        let logits = try model.logits(TokenBatch(ids: ids, batchSize: 1, length: ids.count))
        return crossEntropy(logits.reshaped([ids.count, model.config.vocabSize]), targets: Array(ids.dropFirst()) + [-100])
    }

    /// Installs the offsets and takes `steps` Adam steps (β 0.9, 0.999) of `learningRate` on them, minimizing the
    /// next-token loss of `context` (every model weight stays as it is). Returns the context loss before each step
    /// and after the last (`steps + 1` values).
    @discardableResult
    public func adapt(model: LlamaModel, context: [Int32], steps count: Int, learningRate: Float) throws -> [Float] {
        guard count >= 0, learningRate > 0, learningRate.isFinite else {
            throw GraftError.invalid("router rewiring: steps \(count) must be ≥ 0 and learning_rate \(learningRate) positive")
        }
        install()
        for o in offsets { o.requiringGrad() }
        defer { for o in offsets { o.requiringGrad(false) } }
        var losses: [Float] = []
        for _ in 0..<count {
            for o in offsets { o.grad = nil }
            let loss = try Self.contextLoss(model: model, ids: context)
            losses.append(loss.item)
            guard loss.item.isFinite else {
                throw GraftError(.state, "router rewiring: the context loss is \(loss.item); the offsets were left as they were")
            }
            loss.backward()
            adamStep(learningRate: learningRate)
        }
        losses.append(try withNoGrad { try Self.contextLoss(model: model, ids: context).item })
        return losses
    }

    /// One Adam step on every offset from its gradient (an offset without one does not move).
    private func adamStep(learningRate: Float) {
        steps += 1
        let b1: Float = 0.9, b2: Float = 0.999
        let c1 = 1 - Float(pow(Double(b1), Double(steps))), c2 = 1 - Float(pow(Double(b2), Double(steps)))
        for (k, o) in offsets.enumerated() {
            guard let g = o.grad?.pointer else { continue }
            let p = o.pointer
            for e in 0..<o.count {
                moments[k].m[e] = b1 * moments[k].m[e] + (1 - b1) * g[e]
                moments[k].v[e] = b2 * moments[k].v[e] + (1 - b2) * g[e] * g[e]
                p[e] -= learningRate * (moments[k].m[e] / c1) / ((moments[k].v[e] / c2).squareRoot() + 1e-8)
            }
        }
    }

    /// Rewires the routers on `prompt` (``adapt(model:context:steps:learningRate:)``, from zero offsets) and
    /// generates after it with the rewired routers, which stay installed.
    public func generate(model: LlamaModel, prompt: [Int32], parameters: GenerationParameters, steps: Int,
                         learningRate: Float) throws -> [Int32] {
        reset()
        if prompt.count >= 2 { try adapt(model: model, context: prompt, steps: steps, learningRate: learningRate) }
        install()
        return try model.generate(prompt: prompt, parameters: parameters)
    }
}

/// Saves and loads router rewiring offsets (the MoE base is not saved; load it first).
///
/// A saved directory holds:
/// - `rewiring_config.json`: `{"format": "graft-router-rewiring", "version": 1, "layers": L, "hidden_size": h,
///   "experts": E, "rewired_layers": [l, …]}` plus informational fields;
/// - `router_rewiring.safetensors`: per rewired layer `l`, `model.layers.l.mlp.router.logit_offset` F32 `[E]`;
/// - the `graft_manifest.json` every Graft save writes (kind `router-rewiring`).
public enum RouterRewiringFormat {
    /// The config file's name.
    public static let configName = "rewiring_config.json"
    /// The tensor file's name.
    public static let tensorsName = "router_rewiring.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-router-rewiring"

    /// Saves `rewiring`'s offsets (made for `model`) into `directory`; `extra` adds informational config fields.
    public static func save(_ rewiring: RouterRewiring, model: LlamaModel, to directory: String, extra: [String: Any] = [:]) throws {
        var writer = SafeTensorsWriter()
        for (l, o) in zip(rewiring.layers, rewiring.offsets) { try writer.add("model.layers.\(l).mlp.router.logit_offset", o) }
        try RoutingFiles.write(directory: directory, kind: "router-rewiring", format: formatName, model: model, configName: configName,
                               fields: ["experts": rewiring.offsets.first?.count ?? 0, "rewired_layers": rewiring.layers],
                               extra: extra, tensorsName: tensorsName, writer: writer)
    }

    /// The offsets saved in `directory` for `model` (the MoE base they were adapted on), validated against it;
    /// installed on the model's blocks.
    public static func load(for model: LlamaModel, from directory: String) throws -> RouterRewiring {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        guard let raw = config.object["rewired_layers"] as? [Any] else {
            throw GraftError.format("\(configPath): field 'rewired_layers' must be an array of layer indices")
        }
        let layers = try raw.map { v -> Int in
            guard let l = JSONScalar.integer(v) else { throw GraftError.format("\(configPath): field 'rewired_layers' holds \(v), not a layer index") }
            return l
        }
        let experts = try config.int("experts")
        let rewiring = try RouterRewiring(model: model, layers: layers)
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        let saved = try rewiring.layers.map { try RoutingFiles.tensor(file, path: tensorsPath, "model.layers.\($0).mlp.router.logit_offset", [experts]) }
        for (o, s) in zip(rewiring.offsets, saved) {
            guard o.count == s.count else { throw GraftError.format("\(configPath): field 'experts' is \(experts), the MoE base has \(o.count)") }
            o.pointer.update(from: s.pointer, count: o.count)
        }
        rewiring.install()
        return rewiring
    }
}
