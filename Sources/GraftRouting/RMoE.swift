import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// One MoE layer's part of an RMoE router: the projection of the layer's input into the GRU's width, and the
/// router that reads the GRU's state (the paper's per-layer projector and router; the GRU is shared).
public final class RMoELayerRouter: Module, MoERouter {
    /// The decoder layer the router serves.
    public let layer: Int
    /// `[d, hidden]`: projects the block's input to the GRU's input `x'`.
    public let projection: Tensor
    /// `[E, d]` and `[E]`: the expert scores read from the GRU state `h`.
    public let routerWeight: Tensor, routerBias: Tensor
    /// The RMoE that carries the state between layers (it owns this router).
    weak var owner: RMoE?

    /// A layer router from its weights; throws naming the tensor whose shape does not fit.
    public init(layer: Int, projection: Tensor, routerWeight: Tensor, routerBias: Tensor) throws {
        guard projection.rank == 2, routerWeight.rank == 2, routerWeight.shape[1] == projection.shape[0],
              routerBias.shape == [routerWeight.shape[0]] else {
            throw GraftError.invalid("RMoE layer \(layer): projection \(projection.shape), router.weight \(routerWeight.shape), router.bias \(routerBias.shape) must be [d, hidden], [E, d], [E]")
        }
        self.layer = layer
        self.projection = projection
        self.routerWeight = routerWeight
        self.routerBias = routerBias
        super.init(typeName: "RMoELayerRouter")
        register(parameter: "projection.weight", projection)
        register(parameter: "router.weight", routerWeight)
        register(parameter: "router.bias", routerBias)
    }

    /// The block's expert scores under the recurrent router (the block's own linear ones without an owner).
    public func logits(_ x: Tensor, block: MoEFeedForward) -> Tensor {
        owner?.layerLogits(x, router: self, block: block) ?? block.routerLogits(x)
    }
}

/// RMoE (Qiu et al., 2025, "Layerwise Recurrent Router for Mixture-of-Experts"): a GRU carries routing state across
/// the layers of an MoE base. Per token, layer `i` projects its FFN input `x_i` to `x'_i = P_i x_i`, the GRU shared
/// by all layers updates `h_i = GRU(x'_i, h_{i-1})` (`h_{-1} = 0`), and the layer's router scores the experts from
/// `h_i`: `logits_i = W_i h_i + b_i`. The recurrence runs over layers, not over positions, so a token's routing
/// never depends on other tokens and KV-cached generation is unchanged.
///
/// Installed on an MoE base (``MoEFeedForward/router``), the blocks weigh their routed experts by the router's
/// softmax (``MoECombine/probability``), so the GRU, projections and routers train through the output, and the
/// gradient runs through the GRU state from each layer back to the earlier ones. Departure from the paper, which
/// trains from scratch: with ``addsBaseLogits`` the base's linear router logits are added (frozen), so a new RMoE
/// starts near the base's routing. The experts stay frozen unless ``tunesExperts``.
///
/// The state passes from a block to the next one within a forward pass (layer `i` reads the state layer `i − 1`
/// left, for the same tokens); a block run without its predecessor's state starts from zero.
public final class RMoE: Module {
    /// Width `d` of the GRU's input and state.
    public let gruSize: Int
    /// `[3d, d]` and `[3d, d]`: the GRU's input and state weights (reset, update, new gate rows, as PyTorch's `GRUCell`).
    public let weightIH: Tensor, weightHH: Tensor
    /// `[3d]` and `[3d]`: the GRU's biases.
    public let biasIH: Tensor, biasHH: Tensor
    /// One router per decoder layer.
    public let routers: [RMoELayerRouter]
    /// Whether the experts' weights train too (config `tune_experts`).
    public let tunesExperts: Bool
    /// Whether the base's linear router logits are added to the recurrent router's (config `base_logits`).
    public let addsBaseLogits: Bool
    /// The MoE blocks routed, in layer order.
    public let blocks: [MoEFeedForward]
    private var savedCombine: [MoECombine]?
    private var state: (layer: Int, hidden: Tensor)?

    /// A new RMoE for `model`'s MoE blocks (every layer must have one): GRU weights uniform in `±1/√d` (PyTorch's
    /// initialization), projections N(0, 1/hidden), routers N(0, 0.02²) with zero bias, drawn from `seed`.
    public convenience init(model: LlamaModel, gruSize: Int = 64, tuneExperts: Bool = false, addsBaseLogits: Bool = true,
                            seed: UInt64 = 0) throws {
        guard (1...65536).contains(gruSize) else { throw GraftError.invalid("RMoE: gru_size \(gruSize) must be in 1...65536") }
        let blocks = try Self.blocks(of: model)
        var rng = GraftRNG(seed: seed)
        let d = gruSize, h = model.config.hiddenSize, bound = 1 / Float(d).squareRoot()
        let gru = (0..<2).map { _ in Tensor.randomUniform([3 * d, d], low: -bound, high: bound, rng: &rng) }
        let biases = (0..<2).map { _ in Tensor.randomUniform([3 * d], low: -bound, high: bound, rng: &rng) }
        let routers = try blocks.enumerated().map { i, b in
            try RMoELayerRouter(layer: i, projection: Tensor.randomNormal([d, h], std: 1 / Float(h).squareRoot(), rng: &rng),
                                routerWeight: Tensor.randomNormal([b.experts, d], std: 0.02, rng: &rng),
                                routerBias: Tensor(zeros: [b.experts]))
        }
        try self.init(model: model, weightIH: gru[0], weightHH: gru[1], biasIH: biases[0], biasHH: biases[1],
                      routers: routers, tuneExperts: tuneExperts, addsBaseLogits: addsBaseLogits)
    }

    /// An RMoE from its weights (a saved one); throws naming the tensor that does not fit `model`.
    public init(model: LlamaModel, weightIH: Tensor, weightHH: Tensor, biasIH: Tensor, biasHH: Tensor,
                routers: [RMoELayerRouter], tuneExperts: Bool, addsBaseLogits: Bool) throws {
        let blocks = try Self.blocks(of: model)
        let d = weightHH.shape.last ?? 0
        guard d >= 1, weightIH.shape == [3 * d, d], weightHH.shape == [3 * d, d], biasIH.shape == [3 * d], biasHH.shape == [3 * d] else {
            throw GraftError.invalid("RMoE: GRU weights \(weightIH.shape), \(weightHH.shape), biases \(biasIH.shape), \(biasHH.shape) must be [3d, d], [3d, d], [3d], [3d]")
        }
        guard routers.count == blocks.count else { throw GraftError.invalid("RMoE: \(routers.count) routers for \(blocks.count) MoE layers") }
        for (i, (r, b)) in zip(routers, blocks).enumerated() where r.layer != i || r.projection.shape != [d, b.hiddenSize] || r.routerWeight.shape != [b.experts, d] {
            throw GraftError.invalid("RMoE: router \(i) (layer \(r.layer)) has projection \(r.projection.shape) and router.weight \(r.routerWeight.shape), expected [\(d), \(b.hiddenSize)] and [\(b.experts), \(d)]")
        }
        gruSize = d
        self.weightIH = weightIH
        self.weightHH = weightHH
        self.biasIH = biasIH
        self.biasHH = biasHH
        self.routers = routers
        tunesExperts = tuneExperts
        self.addsBaseLogits = addsBaseLogits
        self.blocks = blocks
        super.init(typeName: "RMoE")
        register(parameter: "gru.weight_ih", weightIH)
        register(parameter: "gru.weight_hh", weightHH)
        register(parameter: "gru.bias_ih", biasIH)
        register(parameter: "gru.bias_hh", biasHH)
        register("routers", ModuleList.numbered(routers))
        for r in routers { r.owner = self }
    }

    /// `model`'s MoE blocks, one per layer; throws when some layer has none.
    static func blocks(of model: LlamaModel) throws -> [MoEFeedForward] {
        let blocks = model.moeBlocks
        guard !blocks.isEmpty, blocks.count == model.layers.count else {
            throw GraftError(.state, "RMoE needs an MoE base (graft moefy): the model has MoE blocks on \(blocks.count) of \(model.layers.count) layers")
        }
        return blocks
    }

    /// Routes the blocks through the recurrent router, each weighing its experts by the router's probabilities.
    public func install() {
        if savedCombine == nil { savedCombine = blocks.map(\.combine) }
        for (b, r) in zip(blocks, routers) {
            b.router = r
            b.combine = .probability
        }
    }

    /// Gives the blocks back their linear routers and combine modes.
    public func remove() {
        for (i, b) in blocks.enumerated() where b.router === routers[i] {
            b.router = nil
            if let savedCombine { b.combine = savedCombine[i] }
        }
        savedCombine = nil
        state = nil
    }

    /// What trains: the GRU, the projections and routers, and the experts' weights when ``tunesExperts``; each
    /// is marked as requiring gradients.
    public var trainableParameters: [Tensor] {
        let experts = tunesExperts ? blocks.flatMap { [$0.gateWeight, $0.upWeight, $0.downWeight] } : []
        return (namedParameters().map(\.tensor) + experts).map { $0.requiringGrad() }
    }

    /// The blocks' router statistics (load, entropy, overflow), in layer order.
    public var statistics: [RouterLayerStatistics] { blocks.map(\.statistics) }

    /// One GRU step for `input` `[T, d]` and state `h` `[T, d]` (PyTorch's `GRUCell`): `r = σ(W_ir x + b_ir + W_hr h
    /// + b_hr)`, `z = σ(W_iz x + b_iz + W_hz h + b_hz)`, `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`,
    /// `h' = (1 − z) ⊙ n + z ⊙ h`. Recorded for autograd.
    public func cell(_ input: Tensor, _ h: Tensor) -> Tensor {
        let d = gruSize
        let gi = linear(input, weightIH, biasIH), gh = linear(h, weightHH, biasHH)
        func part(_ t: Tensor, _ k: Int) -> Tensor { t.slice(dim: 1, (k * d)..<((k + 1) * d)) }
        let r = sigmoid(part(gi, 0) + part(gh, 0)), z = sigmoid(part(gi, 1) + part(gh, 1))
        let n = tanh(part(gi, 2) + r * part(gh, 2))
        return n + z * (h - n)
    }

    /// Layer `router.layer`'s expert scores for its flat input `x` `[T, hidden]`; keeps the new GRU state for the
    /// next layer (dropped after the last one, so no pass's graph outlives it).
    func layerLogits(_ x: Tensor, router: RMoELayerRouter, block: MoEFeedForward) -> Tensor {
        let i = router.layer, tokens = x.rows
        var previous = Tensor(zeros: [tokens, gruSize])
        if i > 0, let state, state.layer == i - 1, state.hidden.rows == tokens { previous = state.hidden }
        let hidden = cell(linear(x, router.projection), previous)
        state = i + 1 < routers.count ? (i, hidden) : nil
        let logits = linear(hidden, router.routerWeight, router.routerBias)
        return addsBaseLogits ? logits + block.routerLogits(x) : logits
    }
}

/// Saves and loads an RMoE. The MoE base is not saved (`graft moefy` saves it; load it first).
///
/// A saved directory holds:
/// - `rmoe_config.json`: `{"format": "graft-rmoe", "version": 1, "layers": L, "hidden_size": h, "experts": E,
///   "gru_size": d, "tune_experts": bool, "base_logits": bool}` plus informational fields;
/// - `rmoe_router.safetensors`: `rmoe.gru.weight_ih` and `rmoe.gru.weight_hh` F32 `[3d, d]`, `rmoe.gru.bias_ih`
///   and `rmoe.gru.bias_hh` `[3d]` (gate rows in the order reset, update, new), and per layer `i`
///   `model.layers.i.mlp.rmoe.projection.weight` `[d, h]`, `model.layers.i.mlp.rmoe.router.weight` `[E, d]`,
///   `model.layers.i.mlp.rmoe.router.bias` `[E]`; with `tune_experts`, also the tuned experts
///   `model.layers.i.mlp.experts.gate_proj` and `.up_proj` `[E, m, h]`, `.down_proj` `[E, h, m]`;
/// - the `graft_manifest.json` every Graft save writes (kind `rmoe-router`).
public enum RMoEFormat {
    /// The config file's name.
    public static let configName = "rmoe_config.json"
    /// The tensor file's name.
    public static let tensorsName = "rmoe_router.safetensors"
    /// The config's `format` value.
    public static let formatName = "graft-rmoe"

    /// Saves `rmoe` (made for `model`) into `directory`; `extra` adds informational config fields.
    public static func save(_ rmoe: RMoE, model: LlamaModel, to directory: String, extra: [String: Any] = [:]) throws {
        var writer = SafeTensorsWriter()
        for (name, t) in [("weight_ih", rmoe.weightIH), ("weight_hh", rmoe.weightHH), ("bias_ih", rmoe.biasIH), ("bias_hh", rmoe.biasHH)] {
            try writer.add("rmoe.gru." + name, t)
        }
        for (r, b) in zip(rmoe.routers, rmoe.blocks) {
            let p = "model.layers.\(r.layer).mlp."
            try writer.add(p + "rmoe.projection.weight", r.projection)
            try writer.add(p + "rmoe.router.weight", r.routerWeight)
            try writer.add(p + "rmoe.router.bias", r.routerBias)
            if rmoe.tunesExperts {
                try writer.add(p + "experts.gate_proj", b.gateWeight)
                try writer.add(p + "experts.up_proj", b.upWeight)
                try writer.add(p + "experts.down_proj", b.downWeight)
            }
        }
        try RoutingFiles.write(directory: directory, kind: "rmoe-router", format: formatName, model: model, configName: configName,
                               fields: ["experts": rmoe.blocks.first?.experts ?? 0, "gru_size": rmoe.gruSize,
                                        "tune_experts": rmoe.tunesExperts, "base_logits": rmoe.addsBaseLogits],
                               extra: extra, tensorsName: tensorsName, writer: writer)
    }

    /// The RMoE saved in `directory` for `model` (already the MoE base it was trained on), validated against it
    /// (the file and field at fault are named). Saved tuned experts are written into the model's blocks. Call
    /// ``RMoE/install()`` to route through it.
    public static func load(for model: LlamaModel, from directory: String) throws -> RMoE {
        let configPath = directory + "/" + configName, tensorsPath = directory + "/" + tensorsName
        let config = try JSONConfig(contentsOf: configPath)
        try RoutingFiles.checkHeader(config, path: configPath, format: formatName, model: model)
        let blocks = try RMoE.blocks(of: model)
        let d = try config.int("gru_size"), experts = try config.int("experts"), h = model.config.hiddenSize
        guard (1...65536).contains(d) else { throw GraftError.format("\(configPath): field 'gru_size' is \(d), expected 1...65536") }
        guard blocks.allSatisfy({ $0.experts == experts }) else {
            throw GraftError.format("\(configPath): field 'experts' is \(experts), the MoE base has \(blocks.first?.experts ?? 0)")
        }
        func flag(_ key: String) throws -> Bool {
            guard let b = JSONScalar.bool(config.object[key]) else { throw GraftError.format("\(configPath): field '\(key)' must be true or false") }
            return b
        }
        let tune = try flag("tune_experts"), base = try flag("base_logits")
        let file = try SafeTensorsFile(contentsOf: tensorsPath)
        func tensor(_ name: String, _ shape: [Int]) throws -> Tensor { try RoutingFiles.tensor(file, path: tensorsPath, name, shape) }
        // Every tensor is read and checked before any expert is written.
        var tuned: [(Tensor, Tensor)] = []
        let routers = try blocks.enumerated().map { i, b in
            let p = "model.layers.\(i).mlp."
            if tune {
                for (name, target) in [("gate_proj", b.gateWeight), ("up_proj", b.upWeight), ("down_proj", b.downWeight)] {
                    tuned.append((target, try tensor(p + "experts." + name, target.shape)))
                }
            }
            return try RMoELayerRouter(layer: i, projection: tensor(p + "rmoe.projection.weight", [d, h]),
                                       routerWeight: tensor(p + "rmoe.router.weight", [experts, d]),
                                       routerBias: tensor(p + "rmoe.router.bias", [experts]))
        }
        let rmoe = try RMoE(model: model, weightIH: tensor("rmoe.gru.weight_ih", [3 * d, d]), weightHH: tensor("rmoe.gru.weight_hh", [3 * d, d]),
                            biasIH: tensor("rmoe.gru.bias_ih", [3 * d]), biasHH: tensor("rmoe.gru.bias_hh", [3 * d]),
                            routers: routers, tuneExperts: tune, addsBaseLogits: base)
        for (target, saved) in tuned { target.pointer.update(from: saved.pointer, count: target.count) }
        return rmoe
    }
}
