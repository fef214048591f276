import GraftModels
import GraftTensor

/// One named adapter: its config, shared state, and the layers it attached to.
public final class NamedAdapter {
    /// The adapter's name (`"default"` unless chosen).
    public let name: String
    /// Its configuration.
    public let config: AdapterConfig
    /// Active / training / merged switches shared by its layers.
    public let state: AdapterState
    /// Attached layers by module path, in model order.
    public internal(set) var layers: [(path: String, linear: Linear, adapter: any LinearAdapterMethod)] = []
    /// Trainable copies of `modules_to_save` modules by module path.
    public internal(set) var savedModules: [(path: String, linear: Linear, adapter: ModulesToSaveLinear)] = []
    /// Frozen tensors shared by all layers (VeRA's projections), by PEFT key; saved with the adapter.
    public internal(set) var shared: [(key: String, tensor: Tensor)] = []
    /// Adapters on modules other than Linear (LN tuning, trainable tokens) by module path.
    public internal(set) var modules: [(path: String, adapter: any ModuleAdapterMethod)] = []
    /// Adapter-wide training behaviour built by the factory (AdaLoRA's rank allocation); see ``trainingHooks``.
    public internal(set) var adapterHooks: [any AdapterTrainingHook] = []
    /// The data-driven initialization (EVA, LoRA-GA, CorDA) this adapter still waits for: set when it is added
    /// with such an `init_lora_weights`, nil once it ran or when weights were loaded into it (a loaded adapter
    /// already holds trained weights and is never initialized again).
    public internal(set) var pendingDataInitialization: DataDrivenInitialization?

    init(name: String, config: AdapterConfig, state: AdapterState) {
        self.name = name
        self.config = config
        self.state = state
    }

    /// Every trainable tensor under its PEFT key (`base_model.model.<path>.<param>`), adapter name stripped.
    public var peftStateDict: [(key: String, tensor: Tensor)] { stateDict(exported: false) }

    /// What PEFT's file holds: ``peftStateDict`` with module adapters' exported forms (P-tuning's encoder output).
    public var peftExportDict: [(key: String, tensor: Tensor)] { stateDict(exported: true) }

    private func stateDict(exported: Bool) -> [(key: String, tensor: Tensor)] {
        var out: [(String, Tensor)] = []
        for (path, _, adapter) in layers {
            for (n, t) in adapter.namedParameters { out.append(("base_model.model.\(path).\(n)", t)) }
        }
        for (path, _, adapter) in savedModules {
            for (n, t) in adapter.namedParameters { out.append(("base_model.model.\(path).\(n)", t)) }
        }
        for (path, adapter) in modules {
            for (n, t) in exported ? adapter.exportedParameters : adapter.namedParameters { out.append((adapter.key(n, path: path), t)) }
        }
        return out
    }

    /// The trainable tensors, in a stable order (shared tensors count when trainable, as VB-LoRA's bank), each once
    /// even when several layers hold it (Lily's shared A and B), so an optimizer steps it once.
    public var parameters: [Tensor] {
        var seen = Set<ObjectIdentifier>()
        return (peftStateDict.map(\.tensor) + shared.map(\.tensor).filter(\.requiresGrad)).filter { seen.insert(ObjectIdentifier($0)).inserted }
    }

    /// Number of trainable scalars.
    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.count } }
}

/// A base model with named adapters attached OpenDelta-style: each target Linear keeps a list of adapters,
/// and adding, activating, disabling, deleting or unmerging adapters never rewrites the base weights.
public final class AdaptedModel: @unchecked Sendable {
    /// The base model's root module.
    public let root: Module
    /// Paths of output heads that `"all-linear"` leaves alone (`lm_head`, a classifier).
    public let outputHeads: Set<String>
    /// Attached adapters in the order they were added.
    public private(set) var adapters: [NamedAdapter] = []
    /// The adapter forward passes use (PEFT's `active_adapter`).
    public private(set) var activeAdapter: String?
    /// When true, no adapter takes part in forward passes (PEFT's `disable_adapter()` context).
    public private(set) var adaptersDisabled = false

    /// The methods adapters can be built with.
    public let methods: AdapterMethodTable

    /// Wraps `root`; `outputHeads` defaults to the conventional head names found in the tree, and `methods`
    /// (default: GraftAdapters' own) says which `peft_type`s can be added.
    public init(root: Module, outputHeads: Set<String>? = nil, methods: AdapterMethodTable = .builtIn) {
        self.root = root
        self.methods = methods
        self.outputHeads = outputHeads ?? Set(root.children.map(\.name).filter { ["lm_head", "classifier", "score"].contains($0) })
    }

    /// The adapter called `name`.
    public func adapter(_ name: String) throws -> NamedAdapter {
        guard let a = adapters.first(where: { $0.name == name }) else {
            throw GraftError(.notFound, "no adapter named '\(name)' (have: \(adapters.map(\.name).joined(separator: ", ")))")
        }
        return a
    }

    /// Attaches a new adapter to every module `config` selects and makes it active.
    ///
    /// Throws when the name is taken, the method is unknown, or nothing matches (naming the patterns and some
    /// module names that exist).
    @discardableResult
    public func addAdapter(_ name: String, config: AdapterConfig, seed: UInt64 = 0) throws -> NamedAdapter {
        guard !name.isEmpty, !name.contains(".") else {
            throw GraftError.invalid("adapter name '\(name)' must be non-empty and contain no '.'")
        }
        guard !adapters.contains(where: { $0.name == name }) else {
            throw GraftError.invalid("an adapter named '\(name)' already exists")
        }
        if let moduleFactory = methods.modules[config.peftType] {
            return try addModuleAdapter(name, config: config, factory: moduleFactory, seed: seed)
        }
        let factory = try methods.factory(for: config)
        try factory.validate(config)
        let undoReplication = try applyLayerReplication(config)
        do {
            let added = try addLinearAdapter(name, config: config, factory: factory, seed: seed)
            added.pendingDataInitialization = DataDrivenInitialization(config)
            return added
        } catch {
            undoReplication?()
            throw error
        }
    }

    private func addLinearAdapter(_ name: String, config: AdapterConfig, factory: any AdapterMethodFactory.Type,
                                  seed: UInt64) throws -> NamedAdapter {
        let state = AdapterState(seed: seed)
        state.adapterName = name
        let named = NamedAdapter(name: name, config: config, state: state)
        let matcher = TargetMatcher(config: config)
        var matchedNonLinear: [String] = []
        var targets: [(String, Linear)] = []
        let parameterTargets = config.peftType == LoRAFactory.peftType ? try parameterTargetPaths(config: config) : []
        let chosen = try factory.targetPaths(config: config, root: root)
        for (path, module) in root.namedModules() where !path.isEmpty {
            let isLinear = module is Linear
            if let chosen {
                guard chosen.contains(path) else { continue }
            } else {
                guard matcher.matches(path: path, isLinear: isLinear, isOutputHead: outputHeads.contains(path))
                        || parameterTargets.contains(path) else { continue }
            }
            guard let lin = module as? Linear else {
                // Containers whose name matches (e.g. "output" in BERT, "self_attn" in Llama) are skipped as PEFT
                // skips them.
                if module.children.isEmpty { matchedNonLinear.append("\(path) (\(module.typeName))") }
                continue
            }
            targets.append((path, lin))
        }
        try checkNotReplacedByMoE(targets.map { ($0.0, $0.1) }, source: config.source)
        named.shared = try factory.sharedTensors(forTargets: targets.map { (path: $0.0, layer: $0.1) }, config: config, state: state)
        let sharedByKey = Dictionary(named.shared.map { ($0.key, $0.tensor) }, uniquingKeysWith: { a, _ in a })
        for (path, lin) in targets {
            named.layers.append((path, lin, try factory.make(for: lin, path: path, config: config, state: state, shared: sharedByKey)))
        }
        if let hook = try factory.trainingHook(for: named) { named.adapterHooks.append(hook) }
        if !matchedNonLinear.isEmpty {
            throw GraftError(.unsupported, "\(config.source): \(config.peftType) adapts Linear layers, but target_modules also selects \(matchedNonLinear.prefix(4).joined(separator: ", "))")
        }
        named.savedModules = try savedModules(config: config, state: state)
        if config.peftType == LoRAFactory.peftType {
            for (path, rows) in try trainableTokenIndexAdapters(config: config, state: state) {
                named.modules.append((path, rows))
                if let tied = tiedHeadTokens(for: rows) { named.modules.append(("lm_head", tied)) }
            }
            if let activation = try aloraActivation(config: config, state: state, layers: named.layers) { named.modules.append(("", activation)) }
            try checkWeightTying(config)
        }
        if named.layers.isEmpty {
            let linears = root.namedModules().filter { $0.module is Linear }.map(\.name)
            let examples = linears.prefix(3) + (linears.count > 3 ? [linears[linears.count - 1]] : [])
            throw GraftError.invalid("\(config.source): target_modules \(describe(config.targetModules))\(config.layersToTransform.map { " with layers_to_transform \($0)" } ?? "") matches no Linear module; modules that exist include \(examples.joined(separator: ", "))")
        }
        try config.rejectUnhonouredKeys()
        for (_, lin, adapter) in named.layers { lin.adapters.append(adapter) }
        for (_, lin, adapter) in named.savedModules { lin.adapters.append(adapter) }
        for (_, adapter) in named.modules { adapter.attach() }
        do {
            try factory.didAttach(named, root: root)
        } catch {
            for (_, lin, adapter) in named.layers { lin.adapters.removeAll { $0 === adapter } }
            for (_, lin, adapter) in named.savedModules { lin.adapters.removeAll { $0 === adapter } }
            for (_, adapter) in named.modules { adapter.detach() }
            throw error
        }
        adapters.append(named)
        try setActiveAdapter(name)
        return named
    }

    /// The trainable copies `modules_to_save` asks for (a classification head), one per matching Linear.
    private func savedModules(config: AdapterConfig, state: AdapterState) throws -> [(String, Linear, ModulesToSaveLinear)] {
        var saved: [(String, Linear, ModulesToSaveLinear)] = []
        for m in config.modulesToSave {
            let hits = root.namedModules().filter { $0.name == m || $0.name.hasSuffix("." + m) }
            for (path, module) in hits {
                guard let lin = module as? Linear else {
                    throw GraftError(.unsupported, "\(config.source): modules_to_save '\(m)' is a \(module.typeName) at '\(path)'; only Linear modules can be saved")
                }
                saved.append((path, lin, ModulesToSaveLinear(base: lin, state: state)))
            }
        }
        return saved
    }

    private func addModuleAdapter(_ name: String, config: AdapterConfig, factory: any ModuleAdapterFactory.Type,
                                  seed: UInt64) throws -> NamedAdapter {
        let state = AdapterState(seed: seed)
        state.adapterName = name
        let named = NamedAdapter(name: name, config: config, state: state)
        let matcher = TargetMatcher(config: config)
        let inputLevel = factory.actsOnInput
        for (path, module) in root.namedModules() {
            if inputLevel {
                // Input-level methods attach to the first module that takes them (the encoder itself).
                guard named.modules.isEmpty, let adapter = try factory.make(for: module, path: path, config: config, state: state) else { continue }
                named.modules.append((path, adapter))
                continue
            }
            guard !path.isEmpty, factory.selectsLayers || matcher.matches(path: path, isLinear: module is Linear, isOutputHead: outputHeads.contains(path)),
                  let adapter = try factory.make(for: module, path: path, config: config, state: state) else { continue }
            named.modules.append((path, adapter))
        }
        if named.modules.isEmpty, AdapterConfig.typesOnMoEBlocks.contains(config.peftType) {
            throw GraftError(.state, "\(config.source): \(config.peftType) adapts the MoE blocks of an MoE base, and this model has none (make one with graft moefy and load it first: MoEBaseFormat.load, or moe_base in a graft train config)")
        }
        guard !named.modules.isEmpty else {
            throw GraftError.invalid("\(config.source): target_modules \(describe(config.targetModules)) matches no module \(config.peftType) applies to")
        }
        named.savedModules = try savedModules(config: config, state: state)
        try config.rejectUnhonouredKeys()
        for (_, lin, adapter) in named.savedModules { lin.adapters.append(adapter) }
        for (_, adapter) in named.modules { adapter.attach() }
        do {
            try factory.didAttach(named, root: root)
        } catch {
            for (_, lin, adapter) in named.savedModules { lin.adapters.removeAll { $0 === adapter } }
            for (_, adapter) in named.modules { adapter.detach() }
            throw error
        }
        adapters.append(named)
        try setActiveAdapter(name)
        return named
    }

    /// Undoes the model-level parts of `a`'s method (``AdapterMethodFactory/didAttach(_:root:)`` or
    /// ``ModuleAdapterFactory/didAttach(_:root:)``) before it is removed.
    private func runWillDetach(_ a: NamedAdapter) {
        if let linear = methods.linear[a.config.peftType] { linear.willDetach(a, root: root) }
        if let module = methods.modules[a.config.peftType] { module.willDetach(a, root: root) }
    }

    private func describe(_ t: TargetModules) -> String {
        switch t {
        case .names(let n): return "[" + n.map { "\"\($0)\"" }.joined(separator: ", ") + "]"
        case .regex(let r): return "regex \"\(r)\""
        case .allLinear: return "\"all-linear\""
        }
    }

    /// Whether the active adapter adds virtual tokens (prompt, prefix, P-tuning): such models need one sequence
    /// per row (padded batches), not packed rows.
    public var needsPaddedBatches: Bool {
        guard !adaptersDisabled, let active = activeAdapter, let a = adapters.first(where: { $0.name == active }) else {
            return false
        }
        // Task-routed methods (Poly / MHR, MTLoRA) route each example (row) by its task: packed rows would mix
        // examples of different tasks.
        if let key = methods.linear[a.config.peftType]?.taskCountKey, (try? a.config.int(key, default: 1)) ?? 1 > 1 { return true }
        return methods.modules[a.config.peftType]?.actsOnInput ?? false
    }

    /// Makes `name` the only adapter that takes part in forward passes.
    public func setActiveAdapter(_ name: String) throws {
        _ = try adapter(name)
        activeAdapter = name
        refreshStates()
    }

    /// Turns every adapter off (true) or restores the active one (false).
    public func setAdaptersDisabled(_ disabled: Bool) {
        adaptersDisabled = disabled
        refreshStates()
    }

    /// Runs `body` with adapters off, as PEFT's `with model.disable_adapter():`.
    public func withAdaptersDisabled<R>(_ body: () throws -> R) rethrows -> R {
        let before = adaptersDisabled
        setAdaptersDisabled(true)
        defer { setAdaptersDisabled(before) }
        return try body()
    }

    private func refreshStates() {
        for a in adapters { a.state.isActive = !adaptersDisabled && a.name == activeAdapter }
    }

    /// Detaches and forgets an adapter (unmerging it first if merged).
    public func deleteAdapter(_ name: String) throws {
        let a = try adapter(name)
        if a.state.isMerged { try unmerge(name) }
        runWillDetach(a)
        for (_, lin, adapter) in a.layers { lin.adapters.removeAll { $0 === adapter } }
        for (_, lin, adapter) in a.savedModules { lin.adapters.removeAll { $0 === adapter } }
        for (_, adapter) in a.modules { adapter.detach() }
        adapters.removeAll { $0.name == name }
        if activeAdapter == name { activeAdapter = adapters.last?.name }
        refreshStates()
        restoreLayerStackIfUnused()
    }

    /// Sets training mode (dropout on) for every adapter.
    public func setTraining(_ training: Bool) {
        for a in adapters { a.state.isTraining = training }
    }

    /// Adds the adapter's ΔW into the base weights so inference pays nothing for it. Reversible with ``unmerge(_:)``.
    public func merge(_ name: String) throws {
        let a = try adapter(name)
        guard !a.state.isMerged else { throw GraftError(.state, "adapter '\(name)' is already merged") }
        try refuseMergingReplicated(a)
        if let (path, m) = a.modules.first(where: { !$0.adapter.mergeable }) {
            throw GraftError(.unsupported, "adapter '\(name)' (\(a.config.peftType)) at '\(path.isEmpty ? "<model>" : path)' cannot be merged into weights: \(m.notMergeableReason)")
        }
        var deltas: [Tensor] = []
        for (path, lin, adapter) in a.layers {
            guard let d = adapter.deltaWeight(base: lin) else {
                throw GraftError(.unsupported, "adapter '\(name)' (\(a.config.peftType)) at '\(path)' cannot be merged")
            }
            deltas.append(d)
        }
        for (path, lin, layer) in a.layers where lin.bias == nil && layer.deltaBias(base: lin) != nil {
            throw GraftError(.unsupported, "adapter '\(name)' (\(a.config.peftType)) at '\(path)' has a bias update but the layer has no bias to merge it into")
        }
        var biasDeltas: [Tensor?] = []
        for ((_, lin, layer), d) in zip(a.layers, deltas) {
            let db = lin.bias == nil ? nil : layer.deltaBias(base: lin)
            // A quantized base weight becomes float32 to take the merge exactly.
            lin.makeWeightDense()
            lin.weight.addInPlace(d)
            if let db, let b = lin.bias { b.addInPlace(db) }
            biasDeltas.append(db)
        }
        mergedBiasDeltas[name] = biasDeltas
        var originals: [(Tensor, Tensor?)] = []
        for (_, lin, saved) in a.savedModules {
            lin.makeWeightDense()
            originals.append((lin.weight.copy(), lin.bias?.copy()))
            lin.weight.pointer.update(from: saved.weight.pointer, count: lin.weight.count)
            if let b = lin.bias, let sb = saved.bias { b.pointer.update(from: sb.pointer, count: b.count) }
        }
        mergedModuleValues[name] = a.modules.map { $0.adapter.merge() }
        a.state.isMerged = true
        mergedDeltas[name] = deltas
        mergedOriginals[name] = originals
    }

    /// Subtracts a merged adapter's ΔW from the base weights again.
    public func unmerge(_ name: String) throws {
        let a = try adapter(name)
        guard a.state.isMerged, let deltas = mergedDeltas[name] else {
            throw GraftError(.state, "adapter '\(name)' is not merged")
        }
        for ((_, lin, _), d) in zip(a.layers, deltas) { withNoGrad { lin.weight.addInPlace(d * -1) } }
        for ((_, lin, _), db) in zip(a.layers, mergedBiasDeltas[name] ?? []) {
            if let db, let b = lin.bias { withNoGrad { b.addInPlace(db * -1) } }
        }
        mergedBiasDeltas[name] = nil
        for ((_, lin, _), (w, b)) in zip(a.savedModules, mergedOriginals[name] ?? []) {
            lin.weight.pointer.update(from: w.pointer, count: w.count)
            if let b, let lb = lin.bias { lb.pointer.update(from: b.pointer, count: b.count) }
        }
        for ((_, adapter), saved) in zip(a.modules, mergedModuleValues[name] ?? []) { adapter.unmerge(saved) }
        mergedModuleValues[name] = nil
        a.state.isMerged = false
        mergedDeltas[name] = nil
        mergedOriginals[name] = nil
    }

    /// Merges the adapter and removes it, leaving a plain model (PEFT's `merge_and_unload`).
    public func mergeAndUnload(_ name: String) throws {
        try merge(name)
        let a = try adapter(name)
        runWillDetach(a)
        for (_, lin, adapter) in a.layers { lin.adapters.removeAll { $0 === adapter } }
        for (_, lin, adapter) in a.savedModules { lin.adapters.removeAll { $0 === adapter } }
        for (_, adapter) in a.modules { adapter.detach() }
        adapters.removeAll { $0.name == name }
        mergedDeltas[name] = nil
        mergedOriginals[name] = nil
        mergedModuleValues[name] = nil
        if activeAdapter == name { activeAdapter = adapters.last?.name }
        refreshStates()
    }

    /// Module parameters replaced by a merge (LN tuning, trainable tokens), per module.
    private var mergedModuleValues: [String: [[Tensor]]] = [:]

    /// Bias changes applied by a merge (IA³), per layer.
    private var mergedBiasDeltas: [String: [Tensor?]] = [:]

    /// Base parameters of `modules_to_save` layers replaced by a merge.
    private var mergedOriginals: [String: [(Tensor, Tensor?)]] = [:]

    /// ΔW of each merged adapter, as applied, so unmerge restores the base bit for bit up to float addition.
    private var mergedDeltas: [String: [Tensor]] = [:]
}
