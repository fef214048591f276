import Foundation

/// Factories added at run time by modules that build on GraftAdapters (GraftRouting's expert mixtures), which
/// the static ``AdapterRegistry/factories`` table cannot name.
final class RegisteredFactories: @unchecked Sendable {
    static let shared = RegisteredFactories()
    private let lock = NSLock()
    private var table: [String: any AdapterMethodFactory.Type] = [:]

    var all: [String: any AdapterMethodFactory.Type] { lock.withLock { table } }
    func add(_ f: any AdapterMethodFactory.Type) { lock.withLock { table[f.peftType.uppercased()] = f } }
}

extension AdapterRegistry {
    /// Registers a Linear-layer method defined outside GraftAdapters (idempotent). Built-in types keep priority.
    public static func register(_ factory: any AdapterMethodFactory.Type) {
        RegisteredFactories.shared.add(factory)
    }

    /// Built-in and registered Linear-layer factories, keyed by upper-case `peft_type`.
    public static var allFactories: [String: any AdapterMethodFactory.Type] {
        factories.merging(RegisteredFactories.shared.all) { builtIn, _ in builtIn }
    }
}
