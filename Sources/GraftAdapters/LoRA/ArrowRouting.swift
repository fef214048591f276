import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// PEFT's `arrow_config` (its `ArrowConfig`) on a LoRA config: which loaded LoRA adapters the router routes over.
public struct ArrowOptions: Sendable {
    /// Adapters each token keeps per layer (PEFT's default 3).
    public var topK: Int
    /// Softmax temperature over the kept scores (default 1).
    public var temperature: Float
    /// The task adapters routed over, in routing order (PEFT names them `task_<i>`).
    public var taskAdapters: [String]
    /// General adapters whose mean is subtracted from every task adapter first (GenKnowSub), when `useGKS`.
    public var generalAdapters: [String]
    /// Whether GenKnowSub runs.
    public var useGKS: Bool
    /// Seed of the power iteration's start vector (PEFT's `rng_seed`; null draws from torch's global generator,
    /// which Graft replaces with seed 0).
    public var seed: UInt64

    /// Reads `arrow_config` from `config`; nil when absent. Throws naming a bad or unknown field.
    public static func parse(_ config: AdapterConfig) throws -> ArrowOptions? {
        guard let raw = config.value("arrow_config"), !(raw is NSNull) else { return nil }
        guard let o = raw as? [String: Any] else {
            throw GraftError.format("\(config.source): 'arrow_config' must be an object, got \(JSONScalar.describe(raw))")
        }
        let known = ["top_k", "router_temperature", "task_adapter_names", "gks_adapter_names", "use_gks", "rng_seed"]
        if let unknown = o.keys.sorted().first(where: { !known.contains($0) }) {
            throw GraftError(.unsupported, "\(config.source): 'arrow_config.\(unknown)' is not an Arrow option Graft knows (known: \(known.joined(separator: ", ")))")
        }
        func names(_ key: String) throws -> [String] {
            guard let v = o[key], !(v is NSNull) else { return [] }
            guard let list = v as? [String] else {
                throw GraftError.format("\(config.source): arrow_config.\(key) must be a list of adapter names, got \(JSONScalar.describe(v))")
            }
            return list
        }
        func number(_ key: String, _ fallback: Double) throws -> Double {
            guard let v = o[key], !(v is NSNull) else { return fallback }
            guard let n = (v as? NSNumber)?.doubleValue, n.isFinite else {
                throw GraftError.format("\(config.source): arrow_config.\(key) must be a number, got \(JSONScalar.describe(v))")
            }
            return n
        }
        let topK = try number("top_k", 3), temperature = try number("router_temperature", 1), seed = try number("rng_seed", 0)
        guard topK >= 1, topK == topK.rounded() else {
            throw GraftError.invalid("\(config.source): arrow_config.top_k must be a positive integer, got \(topK)")
        }
        guard temperature > 0 else {
            throw GraftError.invalid("\(config.source): arrow_config.router_temperature must be positive, got \(temperature)")
        }
        guard seed >= 0, seed == seed.rounded(), seed < 1.8e19 else {
            throw GraftError.invalid("\(config.source): arrow_config.rng_seed must be a non-negative integer, got \(seed)")
        }
        let useGKS = JSONScalar.bool(o["use_gks"]) ?? false
        let options = ArrowOptions(topK: Int(topK), temperature: Float(temperature), taskAdapters: try names("task_adapter_names"),
                                   generalAdapters: try names("gks_adapter_names"), useGKS: useGKS, seed: UInt64(seed))
        guard !options.taskAdapters.isEmpty else {
            throw GraftError.invalid("\(config.source): arrow_config.task_adapter_names is empty; name the loaded LoRA adapters to route over (PEFT's create_arrow_model calls them task_0, task_1, ...)")
        }
        guard !useGKS || !options.generalAdapters.isEmpty else {
            throw GraftError.invalid("\(config.source): arrow_config.use_gks needs gks_adapter_names (the general adapters, PEFT's gks_0, gks_1, ...)")
        }
        return options
    }
}

/// PEFT's Arrow router adapter on one Linear layer (`LoraConfig(arrow_config=...)`, as `create_arrow_model` adds it
/// under the name `arrow_router`): each token scores the task adapters' prototypes by `|⟨v, x⟩|`, keeps the top k,
/// weights them by a softmax over those scores divided by the temperature, and adds `Σ w · s B A x`.
///
/// Built when the router adapter is added, after the task (and general) adapters are loaded, as PEFT builds it on
/// its first forward pass: GenKnowSub subtracts the mean `A` and the mean `B` of the general adapters from every
/// task adapter's `A` and `B` (in place, for good, as PEFT does), then each prototype is PEFT's: 15 power
/// iterations on `Aᵀ (Bᵀ B) A` from a start vector drawn by torch's `randn` under `rng_seed`. The router's own
/// `lora_A` / `lora_B` are saved as PEFT saves them and take no part. Inference only; not mergeable (as in PEFT).
public final class ArrowLoRALayer: LinearAdapterMethod {
    public let state: AdapterState
    /// The router's own factors (saved, unused).
    let own: LoRALayer
    /// The routed task adapters' layers, in routing order.
    public let members: [LoRALayer]
    /// `[members, in]` unit prototypes.
    public let prototypes: Tensor
    let options: ArrowOptions

    init(own: LoRALayer, members: [LoRALayer], prototypes: Tensor, options: ArrowOptions, state: AdapterState) {
        self.own = own
        self.members = members
        self.prototypes = prototypes
        self.options = options
        self.state = state
    }

    /// Finds the task and general adapters on `layer`, runs GenKnowSub and builds the prototypes.
    static func make(for layer: Linear, path: String, own: LoRALayer, options: ArrowOptions, state: AdapterState,
                     source: String) throws -> ArrowLoRALayer {
        func find(_ name: String) throws -> LoRALayer {
            let match = layer.adapters.compactMap { $0 as? LoRALayer }.first { $0.state.adapterName == name }
            guard let lora = match else {
                throw GraftError(.notFound, "\(source): arrow_config names adapter '\(name)', which has no LoRA on '\(path)'; load the task and general adapters under these names before the router (PEFT's create_arrow_model loads them as task_<i>, gks_<i>)")
            }
            guard lora.magnitude == nil, lora.loraBias == nil, !lora.state.isMerged else {
                throw GraftError(.unsupported, "\(source): Arrow routes plain, unmerged LoRA adapters; '\(name)' at '\(path)' is DoRA, has lora_bias or is merged")
            }
            return lora
        }
        let tasks = try options.taskAdapters.map(find)
        if options.useGKS {
            let general = try options.generalAdapters.map(find)
            for (name, t) in zip(options.taskAdapters, tasks) where t.loraA.shape != general[0].loraA.shape || t.loraB.shape != general[0].loraB.shape {
                throw GraftError.invalid("\(source): GenKnowSub needs task and general adapters of one rank; '\(name)' at '\(path)' has \(t.loraA.shape) × \(t.loraB.shape), '\(options.generalAdapters[0])' \(general[0].loraA.shape) × \(general[0].loraB.shape)")
            }
            for keyPath in [\LoRALayer.loraA, \LoRALayer.loraB] {
                let n = general[0][keyPath: keyPath].count
                var mean = [Float](repeating: 0, count: n)
                for g in general { for i in 0..<n { mean[i] += g[keyPath: keyPath].pointer[i] } }
                for i in 0..<n { mean[i] /= Float(general.count) }
                for t in tasks { for i in 0..<n { t[keyPath: keyPath].pointer[i] -= mean[i] } }
            }
        }
        let inF = layer.inFeatures
        let protos = Tensor(zeros: [tasks.count, inF])
        for (j, lora) in tasks.enumerated() {
            let v = arrowPrototype(lora, seed: options.seed)
            (protos.pointer + j * inF).update(from: v, count: inF)
        }
        return ArrowLoRALayer(own: own, members: tasks, prototypes: protos, options: options, state: state)
    }

    public var namedParameters: [(name: String, tensor: Tensor)] { own.namedParameters }
    public func deltaWeight(base: Linear) -> Tensor? { nil }
    public var isEnabled: Bool { state.isActive && !state.isMerged }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let out = y.copy()
        arrowRoutedUpdate(input: x, into: out.pointer, members: members, prototypes: prototypes, topK: options.topK,
                          temperature: options.temperature)
        return out
    }
}

/// PEFT's Arrow prototype of one LoRA: the top right singular vector of `B A` by 15 power iterations on
/// `Aᵀ (Bᵀ B) A` from `randn(in)` under torch's generator seeded `seed`, each step normalised by `‖w‖ + 1e-8`.
public func arrowPrototype(_ lora: LoRALayer, seed: UInt64, iterations: Int = 15) -> [Float] {
    let r = lora.rank, inF = lora.loraA.shape[1], outF = lora.loraB.shape[0]
    var c = [Float](repeating: 0, count: r * r)
    sgemm(transA: true, transB: false, m: r, n: r, k: outF, a: lora.loraB.pointer, b: lora.loraB.pointer, c: &c)
    var generator = TorchGenerator(seed: seed)
    var v = generator.normal(inF)
    func normalise() {
        let norm = v.reduce(Float(0)) { $0 + $1 * $1 }.squareRoot()
        for i in 0..<inF { v[i] /= norm + 1e-8 }
    }
    normalise()
    var u = [Float](repeating: 0, count: r), w = [Float](repeating: 0, count: r)
    for _ in 0..<max(iterations, 1) {
        sgemm(transA: false, transB: false, m: r, n: 1, k: inF, a: lora.loraA.pointer, b: v, c: &u)
        sgemm(transA: false, transB: false, m: r, n: 1, k: r, a: c, b: u, c: &w)
        sgemm(transA: true, transB: false, m: inF, n: 1, k: r, a: lora.loraA.pointer, b: w, c: &v)
        normalise()
    }
    return v
}

/// Arrow's routed update, added into `y` (`[t, out]`) for the input `x` (`[t, in]`): each token keeps the `topK`
/// members with the largest `|⟨prototypeᵢ, x⟩|`, weighted by a softmax of those scores over `temperature`, and gets
/// `Σ wᵢ · sᵢ Bᵢ Aᵢ x`; each member's two GEMMs run on its routed rows only. `record(member, weight)` sees every
/// routing weight given. Inference only (no gradient is recorded).
public func arrowRoutedUpdate(input x: Tensor, into y: UnsafeMutablePointer<Float>, members: [LoRALayer], prototypes: Tensor,
                              topK: Int, temperature: Float, record: ((Int, Float) -> Void)? = nil) {
    let t = x.rows, inF = x.lastDim, n = members.count
    guard t > 0, n > 0, let outF = members.first?.loraB.shape[0] else { return }
    let scores = UnsafeMutablePointer<Float>.allocate(capacity: t * n)
    defer { scores.deallocate() }
    sgemm(transA: false, transB: true, m: t, n: n, k: inF, a: x.pointer, b: prototypes.pointer, c: scores)
    let k = min(max(topK, 1), n)
    var rows = [[Int32]](repeating: [], count: n)
    var weights = [[Float]](repeating: [], count: n)
    for i in 0..<t {
        let row = scores + i * n
        for j in 0..<n { row[j] = abs(row[j]) }
        let top = (0..<n).sorted { row[$0] > row[$1] || (row[$0] == row[$1] && $0 < $1) }.prefix(k)
        let m = row[top[top.startIndex]]
        var z: Float = 0
        for j in top { z += Foundation.exp((row[j] - m) / temperature) }
        for j in top {
            let w = Foundation.exp((row[j] - m) / temperature) / z
            rows[j].append(Int32(i))
            weights[j].append(w)
            record?(j, w)
        }
    }
    for (j, lora) in members.enumerated() where !rows[j].isEmpty {
        let r = lora.rank, count = rows[j].count
        let xe = UnsafeMutablePointer<Float>.allocate(capacity: count * inF)
        let h = UnsafeMutablePointer<Float>.allocate(capacity: count * r)
        let o = UnsafeMutablePointer<Float>.allocate(capacity: count * outF)
        defer { xe.deallocate(); h.deallocate(); o.deallocate() }
        for (i, row) in rows[j].enumerated() { (xe + i * inF).update(from: x.pointer + Int(row) * inF, count: inF) }
        sgemm(transA: false, transB: true, m: count, n: r, k: inF, a: xe, b: lora.loraA.pointer, c: h)
        for i in 0..<count {
            let g = weights[j][i] * lora.scaling
            for c in 0..<r { h[i * r + c] *= g }
        }
        sgemm(transA: false, transB: true, m: count, n: outF, k: r, a: h, b: lora.loraB.pointer, c: o)
        for (i, row) in rows[j].enumerated() {
            let d = y + Int(row) * outF, s = o + i * outF
            for c in 0..<outF { d[c] += s[c] }
        }
    }
}
