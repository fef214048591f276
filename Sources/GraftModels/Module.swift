import GraftTensor

/// A node of a model's module tree. Every module and parameter carries the Hugging Face transformers name,
/// so PEFT `target_modules`, `layers_to_transform` and adapter tensor keys map onto it directly.
open class Module {
    /// The class name shown by `graft inspect` (transformers' class names where one exists).
    public let typeName: String
    /// Child modules in registration order, by local name (`"self"`, `"query"`, `"0"`, ...).
    public private(set) var children: [(name: String, module: Module)] = []
    /// Parameters owned directly by this module, by local name (`"weight"`, `"bias"`).
    public private(set) var localParameters: [(name: String, tensor: Tensor)] = []

    /// Creates a module shown as `typeName`.
    public init(typeName: String) {
        self.typeName = typeName
    }

    /// Adds a child module under `name`.
    public func register(_ name: String, _ module: Module) {
        children.append((name, module))
    }

    /// Replaces the child registered under `name` (a model's layer stack rebuilt by layer replication).
    public func replaceChild(_ name: String, with module: Module) {
        if let i = children.firstIndex(where: { $0.name == name }) { children[i].module = module }
    }

    /// Adds a parameter under `name`.
    public func register(parameter name: String, _ tensor: Tensor) {
        localParameters.append((name, tensor))
    }

    /// Replaces a parameter registered under `name` (used when adapters swap in trainable copies).
    public func replaceParameter(_ name: String, with tensor: Tensor) {
        if let i = localParameters.firstIndex(where: { $0.name == name }) { localParameters[i].tensor = tensor }
    }

    /// This module and every descendant with its dotted path (`encoder.layer.0.attention.self.query`).
    public func namedModules(prefix: String = "") -> [(name: String, module: Module)] {
        var out: [(String, Module)] = [(prefix, self)]
        for (name, child) in children {
            out += child.namedModules(prefix: prefix.isEmpty ? name : prefix + "." + name)
        }
        return out
    }

    /// Parameters this module keeps in a compact frozen format rather than as tensors (a quantized Linear
    /// weight): their local name, shape, the object holding them (shared by tied modules) and a decoder to
    /// float32. None by default.
    open var compactParameters: [(name: String, shape: [Int], source: AnyObject, decode: () -> Tensor)] { [] }

    /// Every parameter below this module with its dotted path (`...query.weight`). Compact frozen weights are
    /// decoded to float32 copies here: use ``namedParameterShapes(prefix:)`` where shapes are enough.
    public func namedParameters(prefix: String = "") -> [(name: String, tensor: Tensor)] {
        namedModules(prefix: prefix).flatMap { path, module in
            module.compactParameters.map { (path.isEmpty ? $0.name : path + "." + $0.name, $0.decode()) }
                + module.localParameters.map { (path.isEmpty ? $0.name : path + "." + $0.name, $0.tensor) }
        }
    }

    /// Every parameter's dotted path and shape, without decoding compact weights.
    public func namedParameterShapes(prefix: String = "") -> [(name: String, shape: [Int])] {
        namedModules(prefix: prefix).flatMap { path, module in
            module.compactParameters.map { (path.isEmpty ? $0.name : path + "." + $0.name, $0.shape) }
                + module.localParameters.map { (path.isEmpty ? $0.name : path + "." + $0.name, $0.tensor.shape) }
        }
    }

    /// The module at a dotted path, if any.
    public func module(at path: String) -> Module? {
        if path.isEmpty { return self }
        var current: Module = self
        for part in path.split(separator: ".") {
            guard let next = current.children.first(where: { $0.name == part })?.module else { return nil }
            current = next
        }
        return current
    }

    /// Number of scalar parameters below this module, counting a tensor shared by several modules (a tied
    /// LM head) once.
    public var parameterCount: Int {
        var seen = Set<ObjectIdentifier>()
        var total = 0
        for (_, module) in namedModules() {
            for (_, t) in module.localParameters where seen.insert(ObjectIdentifier(t.storage)).inserted { total += t.count }
            for compact in module.compactParameters where seen.insert(ObjectIdentifier(compact.source)).inserted {
                total += compact.shape.reduce(1, *)
            }
        }
        return total
    }

    /// A remark shown by `graft inspect` (e.g. that a weight is tied to another module's).
    public var note: String?

    /// A short description of this module's own configuration for `graft inspect` (e.g. `in=384, out=384`).
    open var summary: String { "" }
}

/// A container with no computation of its own (`encoder`, `layer`, `attention`, ...).
public final class ModuleList: Module {
    /// Creates a container shown as `typeName` holding `children` in order.
    public init(typeName: String = "ModuleList", _ children: [(String, Module)] = []) {
        super.init(typeName: typeName)
        for (name, child) in children { register(name, child) }
    }

    /// A `ModuleList` of numbered children (`0`, `1`, ...), as transformers' `nn.ModuleList`.
    public static func numbered(_ modules: [Module]) -> ModuleList {
        ModuleList(modules.enumerated().map { (String($0.offset), $0.element) })
    }
}
